"""The training machinery that finetune_solver.py wires together.

    distributed.py    launch environment (torchrun, srun, one process), process groups, collectives
    parallelize.py    FSDP2 sharding, mixed precision, activation checkpointing
    checkpointing.py  sharded resumable checkpoints (atomic), RNG capture, HF exports
    optim.py          AdamW groups and Lumina's learning-rate schedule
    metrics.py        metrics.jsonl, console lines, throughput and MFU
    dashboards.py     TensorBoard and W&B (the ``dashboards`` extra)
    evaluation.py     validation loss
    run_controls.py   --skip_iterations, --deterministic
    lifecycle.py      stop signals, --exit_duration_in_mins, the hung-rank watchdog (--hang_timeout), exit statuses
    trainable.py      --trainable subsets, row-level freezing, --only_save_trainable
    lora.py           LoRA through peft (the ``lora`` extra)
    planner.py        --plan: memory and compute for a model, flags and cluster shape
    flags.py          dataclass -> argparse parsers (also used by generate.py)

May import: the network (model/*.py), model/tokenizer/, data/files.py, data/stop_signals.py. Never the training
data path (finetune_solver.py hands batches in), nor model/generation/.
"""
