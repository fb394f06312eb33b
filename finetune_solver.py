r"""Fine-tunes a Chameleon / Lumina-mGPT model on pre-tokenized data with torch FSDP (Lumina's flags).

    # one process on a CPU (tiny model; see exps/demo.sh for making one)
    python finetune_solver.py --init_from out/tiny_model --data_config out/data.yaml --output_dir out/run \
        --precision fp32 --batch_size 2 --accum_iter 1 --epochs 1 --num_workers 0 --log_every 1
    # two processes on one machine (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node 2 finetune_solver.py --init_from ... --data_config ... --output_dir ...
    # a SLURM job, one task per GPU (exps/7B.sh holds Lumina's hyper-parameters)
    srun -n32 --ntasks-per-node=8 --gres=gpu:8 bash exps/7B.sh
    python finetune_solver.py -h

One step = ``accum_iter`` micro-batches of ``batch_size`` items on each of the world's ranks; the global
batch is batch_size * accum_iter * world_size items. The loss of a step is the mean over all labelled
tokens of the global batch (see model/chameleon_lm.py for the loss, model/training/parallelize.py for FSDP,
model/training/checkpointing.py for the checkpoint layout, model/training/metrics.py for metrics.jsonl). Reruns in the same
--output_dir resume from the newest complete checkpoint (--auto_resume), exactly where it stopped.
SIGTERM or SIGUSR1 to any rank (scancel, preemption, #SBATCH --signal), or --exit_duration_in_mins, stop all
ranks at the next step with a checkpoint and exit status 75; a rank without progress for --hang_timeout writes
its stacks to OUTPUT_DIR/hang/ and exits 77 (model/training/lifecycle.py; README: On a cluster with time limits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from data.loader import build_indexes, build_train_data
from data.packing import block_causal_mask
from data.data_config import DataConfigError
from data.eval_data import EvalData
from data.records import IGNORE_INDEX, RecordFormatError
from data.stop_signals import parse_signals
from model.training import checkpointing as ckpt
from model.chameleon_lm import (ChameleonLM, ModelLoadError, build_chameleon_lm, config_from_dict, load_hf_config,
                                only_model_keys, read_hf_weights, read_vq_weights, resolve_hf_dir, zero_image_head)
from model.training.flags import dataclass_parser, flag
from model.training.distributed import (LaunchError, all_reduce_sum, cleanup_distributed, detect_launch_env,
                               init_distributed, init_model_parallel)
from model.lumina_layout import choose_qk_norm_groups, lumina_export_problem, save_lumina
from model.training.lora import LoraError, apply_lora, flag_problems as lora_flag_problems, hf_to_model_state, merged_hf_state
from model.training.dashboards import DashboardError, missing_packages, open_dashboards
from model.training.evaluation import Evaluator
from model.training.metrics import (EtaClock, MetricsWriter, TypeLoss, flops_per_token, format_console, peak_memory_mb,
                           reset_peak_memory, setup_logging, teardown_logging)
from model.training.run_controls import SkipRanges, enable_determinism
from model.training.lifecycle import Lifecycle, enable_nccl_flight_recorder, flag_problems as lifecycle_flag_problems
from model.training.optim import build_optimizer, lr_at, set_lr
from model.training.parallelize import DTYPES, parallelize, set_gradient_sync
from model.training.trainable import (TRAINABLE_HELP, TrainableError, apply_trainable, attach_to_optimizer, base_model_record,
                             check_base_model, mask_frozen_rows, saved_model_keys, shard_row_masks)
from model.sharded_load import load_sharded_safetensors, sharded_loading_applies
from model.training.planner import run_plan
from model.generation.generator import GenerationInputError
from model.generation.prompts import T2I_TEMPLATE
from model.generation.samples import TrainingSamples, sample_flag_problems

logger = logging.getLogger("finetune_solver")

# Lumina's starting points when --init_from is not given (its _make_and_save_starting_point)
STARTING_POINTS = {"7B": "Alpha-VLLM/Chameleon_7B_mGPT", "34B": "Alpha-VLLM/Chameleon_34B_mGPT"}


_f = flag


@dataclass
class TrainArgs:
    """All flags. Lumina's names, defaults and meanings unless the help says otherwise."""

    # schedule
    batch_size: int = _f(4, "items per micro-batch per rank (global batch = batch_size * accum_iter * world size)")
    accum_iter: int = _f(4, "micro-batches accumulated per optimizer step")
    epochs: int = _f(1, "epochs to train")
    warmup_epochs: float = _f(0.03, "linear warmup length in (fractional) epochs; then half-cycle cosine")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in all (schedule still spans --epochs); "
                                     "0 builds everything and exits; a checkpoint is written at the stop")
    # optimizer
    lr: float = _f(2e-5, "peak learning rate (absolute)")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine")
    wd: float = _f(0.0, "AdamW weight decay (betas 0.9, 0.95); not applied to norms and biases")
    decay_norm_and_bias: bool = _f(False, "also decay norm weights and biases, as Lumina does",
                                   neg="--no_decay_norm_and_bias")
    clip_grad: float = _f(4.0, "clip the global gradient norm to this (<= 0: no clipping)")
    # model
    init_from: str | None = _f(None, "HF-format Chameleon dir or hub id to start from; if unset, Lumina's "
                                     "starting point for --model_size is made in OUTPUT_DIR/starting_point")
    model_size: str = _f("7B", "which Lumina starting point to make when --init_from is unset", choices=["7B", "34B"])
    max_seq_len: int = _f(4096, "items are truncated to this many tokens")
    mask_image_logits: bool = _f(True, "mask image-code logits where the target is text (see model/chameleon_lm.py)",
                                 neg="--unmask_image_logits")
    dropout: float = _f(0.0, "residual dropout after attention and MLP of every layer")
    z_loss_weight: float = _f(0.0, "weight of the z-loss (mean logsumexp^2 over labelled tokens)")
    loss_chunk_size: int = _f(1024, "labelled tokens per chunk of the head + loss (memory vs speed)")
    # data
    data_config: str | None = _f(None, "data config YAML (META: [{path, type, ratio}]); required")
    cache_ann_on_disk: bool = _f(False, "accepted for Lumina compatibility: our record index is always "
                                        "memory-mapped from disk and shared by the ranks", neg="--no_cache_ann_on_disk")
    length_clustering: bool = _f(True, "put items of similar length in the same global batch",
                                 neg="--disable_length_clustering")
    packing: bool = _f(False, "pack several items per row with a block-causal mask", neg="--no_packing")
    num_workers: int = _f(8, "DataLoader worker processes per rank")
    pin_mem: bool = _f(True, "pin DataLoader memory (used only with CUDA)", neg="--no_pin_mem")
    seed: int = _f(0, "seed of data order, dropout and everything random")
    # parallelism
    model_parallel_size: int = _f(1, "tensor-parallel size; only 1 is implemented (FSDP shards the model)")
    data_parallel: str = _f("fsdp", "fsdp: full shard; sdp: shard grads and optimizer only", choices=["fsdp", "sdp"])
    precision: str = _f("bf16", "compute dtype; use fp32 on CPU", choices=["fp32", "tf32", "bf16", "fp16"])
    grad_precision: str = _f("fp32", "dtype of the gradient reduction", choices=["fp32", "bf16", "fp16"])
    checkpointing: bool = _f(False, "activation checkpointing of every decoder layer", neg="--no_checkpointing")
    compile: bool = _f(False, "torch.compile each decoder layer (per block, before FSDP wraps it; torchtitan's "
                              "recipe): the first step compiles, later steps run fused kernels; same flags, "
                              "checkpoints and resume as without", neg="--no_compile")
    dist_timeout: float = _f(1800.0, "seconds a collective may wait before failing (a dead rank stops the others)")
    # stop signals, time limit, hung ranks (model/training/lifecycle.py; README: On a cluster with time limits)
    exit_signals: str = _f("SIGTERM,SIGUSR1", "comma-separated signals that stop the run at the next optimizer-step "
                                              "boundary on all ranks, with a checkpoint, exit status 75 (requeue); "
                                              "a second one exits at once (76); none: off")
    exit_grace_s: float = _f(120.0, "after a stop signal, seconds to reach a step boundary; past it (a long "
                                    "evaluation or save in the way) the run exits at once with status 76 and no new "
                                    "checkpoint (the newest complete one stays valid)")
    exit_duration_in_mins: float | None = _f(None, "stop like a signal (checkpoint, exit 75) once the run has been "
                                                   "going this many minutes, set-up included (rank 0's clock); "
                                                   "set it a step plus a save below the job's time limit")
    hang_timeout: float = _f(1800.0, "seconds without progress (a step, checkpoint, evaluation or sampling round "
                                     "done) after which a rank writes the stacks of all its threads to "
                                     "OUTPUT_DIR/hang/rank{r}-step{N}.txt and exits with status 77; 0: off")
    # output
    output_dir: str = _f("./output_dir", "where checkpoints, logs and metrics.jsonl go")
    save_interval: int = _f(1, "save epoch{E}/ every this many epochs (and after the last)")
    save_iteration_interval: int = _f(5000, "save epoch{E}-iter{I}/ every this many optimizer steps (0: never)")
    only_save_trainable: bool = _f(False, "checkpoints hold only the trainable tensors and their optimizer state; "
                                          "resume and export take the rest from --init_from (checked by "
                                          "fingerprint)", neg="--no_only_save_trainable")
    ckpt_max_keep: int = _f(2, "keep this many newest checkpoints (<= 0: all)")
    auto_resume: bool = _f(True, "resume from the newest complete checkpoint in --output_dir", neg="--no_auto_resume")
    resume_path: str | None = _f(None, "resume from this checkpoint directory (wins over --auto_resume)")
    export_hf: bool = _f(True, "write an HF-format model into epoch{E}/hf/ at each epoch checkpoint",
                         neg="--no_export_hf")
    # Lumina layout export (model/lumina_layout.py)
    export_layout: str = _f("hf", "layouts of the epoch exports: hf (epoch{E}/hf/, transformers), lumina "
                                  "(epoch{E}/lumina/, Lumina-mGPT's own tools), or both", choices=["hf", "lumina", "both"])
    log_every: int = _f(10, "console line and metrics.jsonl row every this many steps")
    # trainable subsets and LoRA (model/training/trainable.py, model/training/lora.py)
    trainable: str | None = _f(None, TRAINABLE_HELP)
    lora_rank: int = _f(0, "LoRA rank through peft (0: no LoRA; needs pip install -e .[lora]); the base weights freeze")
    lora_alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch input")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated linear layers of each decoder layer that "
                                                           "get LoRA: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    # skipped steps and determinism (model/training/run_controls.py)
    skip_iterations: list[str] | None = _f(None, "optimizer steps whose global batches are consumed from the sampler "
                                                 "but not trained on (no forward, backward or update; Megatron's "
                                                 "--skip-train-iteration-range): 1-based inclusive START-END ranges "
                                                 "or single steps, e.g. 100-110 300-400", nargs="+")
    deterministic: bool = _f(False, "deterministic algorithms only: torch.use_deterministic_algorithms, "
                                    "CUBLAS_WORKSPACE_CONFIG, no TF32, deterministic cuDNN, math attention "
                                    "(slower; see README)", neg="--no_deterministic")
    # dashboards and per-type curves (model/training/dashboards.py, model/training/metrics.py)
    tensorboard: bool = _f(False, "write every metrics.jsonl scalar to TensorBoard event files in "
                                  "OUTPUT_DIR/tensorboard/ (pip install -e .[dashboards])", neg="--no_tensorboard")
    wandb: bool = _f(False, "log every metrics.jsonl scalar to Weights & Biases; a resumed run continues the "
                            "same W&B run (pip install -e .[dashboards])", neg="--no_wandb")
    wandb_project: str = _f("lumina-stack", "W&B project (with --wandb)")
    wandb_run_name: str | None = _f(None, "W&B run name (with --wandb; default: W&B's generated name)")
    wandb_mode: str | None = _f(None, "W&B mode (with --wandb): online, or offline (no network; upload later with "
                                      "`wandb sync`); default: WANDB_MODE, else online", choices=["online", "offline"])
    type_loss_window: int = _f(10, "metrics.jsonl loss/{type}: mean loss of the last this many trained steps of "
                                   "that data-config type")
    # validation loss (model/training/evaluation.py, data/eval_data.py)
    val_data_config: str | None = _f(None, "data config YAML of held-out records (training format; ratio ignored): "
                                           "val_loss, val_loss/{type} at each epoch end and every --eval_every steps")
    eval_every: int = _f(0, "evaluate on --val_data_config every this many optimizer steps (0: at epoch ends only)")
    eval_items: int | None = _f(None, "evaluate on this many held-out records (the same ones every time; default: all)")
    # memory and compute plan (model/training/planner.py): --plan prints it for these flags and exits, no GPU needed
    plan: bool = _f(False, "print the per-rank memory and compute plan of these flags and exit (no data, weights, "
                           "GPU or process group needed; --data_config not required)", neg="--no_plan")
    json: bool = _f(False, "with --plan: print the plan as one JSON object (keys in the README)", neg="--no_json")
    world_size: int | None = _f(None, "with --plan: ranks (GPUs) to plan for; default WORLD_SIZE or SLURM_NTASKS, else 1")
    gpu_memory_gb: float = _f(80.0, "with --plan: memory of one GPU in GB (1e9 bytes), the verdict's limit")
    gpu: str = _f("H100", "with --plan: GPU whose peak FLOP/s sets step time and tokens/s",
                  choices=["H100", "H200", "A100"])
    mfu: float = _f(0.4, "with --plan: model FLOPs utilisation assumed for step time and tokens/s")
    # samples during training (model/generation/samples.py)
    sample_prompts: str | None = _f(None, "generate from the current weights into OUTPUT_DIR/samples/step{N}/: "
                                          "text-to-image prompts (.txt, one per line) or Lumina conversations "
                                          "ending with the human turn (.json/.jsonl); off if unset")
    sample_every: int = _f(0, "samples every this many optimizer steps (0: only at each epoch end)")
    sample_tokenizer_dir: str | None = _f(None, "tokenizer bundle for the samples (prompts, VQGAN decoding); "
                                                "required with --sample_prompts")
    sample_resolution: str = _f("512x512", "WxH in pixels of text-to-image samples")
    sample_template: str = _f(T2I_TEMPLATE.replace("\n", "\\n"),
                              "template each text-to-image sample prompt is wrapped in, with {W}, {H}, {prompt} "
                              "('\\n' is a newline); default Lumina's; use the form your t2i data is written in")
    sample_cfg: float = _f(4.0, "classifier-free guidance scale of text-to-image samples")
    sample_max_new_tokens: int = _f(256, "new tokens per answer sample")


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(TrainArgs, __doc__)


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = TrainArgs(**vars(ns))
    problems = validate_args(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def validate_args(a: TrainArgs) -> list[str]:
    """Problems found in the flags, each naming its flag (empty when all is well)."""
    bad = []
    for name in ("batch_size", "accum_iter", "epochs", "save_interval", "log_every", "loss_chunk_size"):
        if getattr(a, name) < 1:
            bad.append(f"--{name} must be >= 1 (got {getattr(a, name)})")
    if a.max_seq_len < 2:
        bad.append(f"--max_seq_len must be >= 2, a token and the one it predicts (got {a.max_seq_len})")
    if not 0 <= a.warmup_epochs <= max(a.epochs, 0):
        bad.append(f"--warmup_epochs must be in [0, --epochs] (got {a.warmup_epochs})")
    if not a.lr > 0:
        bad.append(f"--lr must be > 0 (got {a.lr})")
    if not 0 <= a.min_lr <= a.lr:
        bad.append(f"--min_lr must be in [0, --lr] (got {a.min_lr})")
    if a.wd < 0:
        bad.append(f"--wd must be >= 0 (got {a.wd})")
    if not 0 <= a.dropout < 1:
        bad.append(f"--dropout must be in [0, 1) (got {a.dropout})")
    if a.z_loss_weight < 0:
        bad.append(f"--z_loss_weight must be >= 0 (got {a.z_loss_weight})")
    if a.num_workers < 0:
        bad.append(f"--num_workers must be >= 0 (got {a.num_workers})")
    if a.seed < 0:
        bad.append(f"--seed must be >= 0 (got {a.seed})")
    if a.save_iteration_interval < 0:
        bad.append(f"--save_iteration_interval must be >= 0 (got {a.save_iteration_interval})")
    if a.max_steps is not None and a.max_steps < 0:
        bad.append(f"--max_steps must be >= 0 (got {a.max_steps})")
    if a.dist_timeout <= 0:
        bad.append(f"--dist_timeout must be > 0 (got {a.dist_timeout})")
    if a.model_parallel_size != 1:
        bad.append(f"--model_parallel_size {a.model_parallel_size}: tensor parallelism is not implemented; use 1 "
                   f"(FSDP shards parameters, gradients and optimizer state over all ranks)")
    if a.plan and (a.world_size is not None and a.world_size < 1 or not 0 < a.mfu <= 1 or a.gpu_memory_gb <= 0):
        bad.append(f"--plan needs --world_size >= 1, 0 < --mfu <= 1 and --gpu_memory_gb > 0 (got {a.world_size}, "
                   f"{a.mfu}, {a.gpu_memory_gb})")
    if a.data_config is None:
        if not a.plan:
            bad.append("--data_config is required (a YAML with META: [{path, type, ratio}])")
    elif not a.plan and not Path(a.data_config).is_file():
        bad.append(f"--data_config {a.data_config}: no such file")
    if a.resume_path is not None and not Path(a.resume_path).is_dir():
        bad.append(f"--resume_path {a.resume_path}: no such directory")
    if a.init_from is not None and a.init_from.startswith((".", "/", "~")) and not Path(a.init_from).expanduser().is_dir():
        bad.append(f"--init_from {a.init_from}: no such directory")
    if a.export_layout != "hf" and not a.export_hf:
        bad.append(f"--export_layout {a.export_layout} asks for epoch exports, which --no_export_hf turns off")
    if a.trainable is not None and not [e for e in a.trainable.split(",") if e.strip()]:
        bad.append(f"--trainable {a.trainable!r}: give presets or globs, e.g. image_head or 'model.layers.*.mlp.*'")
    bad += lora_flag_problems(a)
    bad += lifecycle_flag_problems(a.exit_signals, a.exit_grace_s, a.exit_duration_in_mins, a.hang_timeout)
    bad += _validate_observability(a)
    bad += sample_flag_problems(a)
    return bad


def _validate_observability(a: TrainArgs) -> list[str]:
    """Problems with --skip_iterations, --deterministic, the dashboards and validation flags."""
    bad = []
    try:
        SkipRanges.parse(a.skip_iterations)
    except ValueError as e:
        bad.append(str(e))
    if a.deterministic and a.precision == "tf32":
        bad.append("--deterministic turns TF32 off; it cannot be combined with --precision tf32 (use fp32)")
    bad += missing_packages(a.tensorboard, a.wandb)
    if a.type_loss_window < 1:
        bad.append(f"--type_loss_window must be >= 1 (got {a.type_loss_window})")
    if a.val_data_config is not None and not Path(a.val_data_config).is_file():
        bad.append(f"--val_data_config {a.val_data_config}: no such file")
    if a.eval_every < 0:
        bad.append(f"--eval_every must be >= 0 (got {a.eval_every})")
    if a.eval_items is not None and a.eval_items < 1:
        bad.append(f"--eval_items must be >= 1 (got {a.eval_items})")
    if a.val_data_config is None and (a.eval_every or a.eval_items is not None):
        bad.append("--eval_every / --eval_items need --val_data_config (the held-out records to evaluate on)")
    return bad


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, bad data or model); the message says why and where."""


# ------------------------------------------------------------------------------------------------------------
# setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _broadcast(obj, rank: int):
    """rank 0's ``obj`` on every rank; an Exception from rank 0 is re-raised everywhere (no rank hangs)."""
    box = [obj if rank == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _resolve_model_dir(a: TrainArgs, rank: int, resume: Path | None) -> tuple[str, dict]:
    """(directory of the initial HF weights, its config dict with the run's q/k-norm grouping), decided on
    rank 0 and broadcast."""
    result: object = None
    if rank == 0:
        try:
            if a.init_from is not None:
                d = resolve_hf_dir(a.init_from)
            else:  # Lumina: download its converted Chameleon and zero the image-code rows of the head
                d = Path(a.output_dir) / "starting_point"
                if (d / "config.json").is_file():
                    logger.warning("using the existing starting point %s (made by an earlier run; delete it to "
                                   "remake it)", d)
                else:
                    logger.info("making the starting point %s from %s", d, STARTING_POINTS[a.model_size])
                    zero_image_head(resolve_hf_dir(STARTING_POINTS[a.model_size]), d)
            cfg = load_hf_config(d)
            cfg.qk_norm_groups = choose_qk_norm_groups(d, cfg, resume)  # Lumina's per-shard q/k norms
            result = (str(d), json.loads(cfg.to_json_string()))
        except (ModelLoadError, OSError) as e:
            result = TrainingStopped(str(e))
    return _broadcast(result, rank)


def _load_initial_weights(lm: ChameleonLM, model_dir: str, rank: int) -> None:
    """rank 0 reads the HF weights; FSDP's set_model_state_dict broadcasts and shards them (.bin checkpoints;
    safetensors load by slices on every rank, model/sharded_load.py)."""
    full: object = {}
    if rank == 0:
        try:
            full = hf_to_model_state(lm, read_hf_weights(Path(model_dir), lm.config))  # LoRA: wrapped names
            full = only_model_keys(full, set(lm.state_dict().keys()), model_dir)
        except (ModelLoadError, OSError) as e:
            full = TrainingStopped(str(e))
    _broadcast(full if isinstance(full, Exception) else None, rank)  # raises on every rank if rank 0 failed
    set_model_state_dict(lm, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _rng_neutral(loader):
    """Iterates ``loader`` without letting its start (DataLoader draws a base seed from the global torch RNG)
    move the RNG stream that dropout uses: a resumed run and an uninterrupted one then draw the same masks."""
    state = torch.get_rng_state()
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return
    finally:
        torch.set_rng_state(state)
    yield first
    yield from it


def _count_params(lm: ChameleonLM) -> tuple[int, int]:
    total = sum(p.numel() for p in lm.parameters())
    return total, total - lm.model.embed_tokens.weight.numel()


# ------------------------------------------------------------------------------------------------------------
# one optimizer step


def train_step(lm: ChameleonLM, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *, a: TrainArgs,
               device: torch.device, lr: float, n_params_no_embed: int,
               phase: Callable[[str], None] = lambda name: None) -> dict:
    """Forward/backward over this rank's micro-batches, clip, AdamW. Returns the global step metrics; raises
    TrainingStopped (on every rank alike) before updating when the loss or gradient norm is not finite.
    ``phase`` is told where the step is (a hang report names it; model/training/lifecycle.py)."""
    phase("forward/backward")
    local_labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    n_labelled = all_reduce_sum([local_labelled], device)[0]
    # FSDP averages gradients over ranks, so world / n makes the result the global token mean
    scale = dist.get_world_size() / n_labelled if n_labelled > 0 else 0.0
    set_lr(optimizer, lr)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    z_sum = torch.zeros((), dtype=torch.float64, device=device)
    real_tokens, flops = 0, 0.0
    cfg = lm.config
    for i, b in enumerate(micro_batches):
        if a.data_parallel == "sdp":
            set_gradient_sync(lm, i == len(micro_batches) - 1)
        input_ids = b["input_ids"].to(device, non_blocking=True)
        labels = b["labels"].to(device, non_blocking=True)
        if a.packing:
            mask = block_causal_mask(b["doc_ids"]).to(device, non_blocking=True)
            pos = b["position_ids"].to(device, non_blocking=True)
        else:  # right padding under a causal mask: padding never reaches a real token, no mask needed
            mask, pos = None, None
        out = lm(input_ids, labels, attention_mask=mask, position_ids=pos, loss_scale=scale)
        out.loss.backward()
        ce_sum += out.ce_sum.double()
        z_sum += out.z_sum.double()
        real_tokens += int(b["n_real_tokens"])
        bsz, seqlen = input_ids.shape
        flops += bsz * seqlen * flops_per_token(n_params_no_embed, cfg.num_hidden_layers, cfg.hidden_size, seqlen)
    phase("optimizer")
    mask_frozen_rows(lm)  # --trainable image_head: frozen rows get exactly zero gradient
    max_norm = a.clip_grad if a.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(lm.parameters(), max_norm=max_norm, foreach=True)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    ce_tot, z_tot, real_tot, flops_tot = all_reduce_sum([ce_sum.item(), z_sum.item(), real_tokens, flops], device)
    denom = max(n_labelled, 1.0)
    closs, z_loss = ce_tot / denom, z_tot / denom
    loss = closs + a.z_loss_weight * z_loss
    gn = float(grad_norm)
    if not (math.isfinite(loss) and math.isfinite(gn)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingStopped(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                              f"(loss {loss}, grad_norm {gn})")
    if n_labelled > 0:
        optimizer.step()
    else:
        logger.warning("no labelled token in this global batch: no update")
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "closs": closs, "z_loss": z_loss, "grad_norm": gn, "tokens": int(n_labelled),
            "real_tokens": real_tot, "flops": flops_tot}


def _open_metrics(a: TrainArgs, out: Path, rank: int, resumed_step: int | None) -> MetricsWriter:
    """metrics.jsonl and the dashboards asked for (rank 0); a dashboard that cannot start stops every rank."""
    sinks: object = []
    if rank == 0:
        try:
            sinks = open_dashboards(out, enabled=True, tensorboard=a.tensorboard, wandb=a.wandb,
                                    wandb_project=a.wandb_project, wandb_run_name=a.wandb_run_name,
                                    wandb_mode=a.wandb_mode, config=dataclasses.asdict(a), resumed_step=resumed_step)
        except (DashboardError, OSError) as e:
            sinks = e if isinstance(e, DashboardError) else DashboardError(f"dashboards in {out}: {e}")
    _broadcast(sinks if isinstance(sinks, Exception) else None, rank)
    return MetricsWriter(out, enabled=rank == 0, sinks=sinks)


def _build_evaluator(a: TrainArgs, rank: int, world: int, device: torch.device, pad_id: int) -> Evaluator | None:
    if a.val_data_config is None:
        return None
    val = EvalData.build(a.val_data_config, max_seq_len=a.max_seq_len, batch_size=a.batch_size,
                         eval_items=a.eval_items, seed=a.seed, pad_id=pad_id, world_size=world, rank=rank)
    return Evaluator(val, val.type_names, every=a.eval_every, z_loss_weight=a.z_loss_weight, device=device)


def _checked_train_step(lm: ChameleonLM, optimizer: torch.optim.Optimizer, micro: list[dict], *, a: TrainArgs,
                        device: torch.device, lr: float, n_params_no_embed: int, out: Path, where: str,
                        phase: Callable[[str], None]) -> dict:
    """train_step; when it stops the run, the message names the step and the checkpoint left intact."""
    try:
        return train_step(lm, optimizer, micro, a=a, device=device, lr=lr, n_params_no_embed=n_params_no_embed,
                          phase=phase)
    except TrainingStopped as e:
        last = ckpt.latest_checkpoint(out)
        raise TrainingStopped(f"{where}: {e}; stopping before the update. Newest checkpoint, left intact: "
                              f"{last if last is not None else 'none'}") from None


def _next_global_batch(batches, accum_iter: int, where: str) -> list[dict]:
    try:
        return [next(batches) for _ in range(accum_iter)]
    except (RecordFormatError, OSError) as e:  # e.g. a data file deleted mid-run (also from a worker)
        raise TrainingStopped(f"{where}: cannot read the training data: {e}") from e


def _step_row(m: dict, *, step: int, epoch: int, it: int, lr: float, dt: float, t_data: float, world: int,
              device: torch.device, batch_type: str) -> dict:
    """The metrics.jsonl row of a trained step (model/training/metrics.py lists the keys)."""
    return {"step": step, "epoch": epoch, "iter": it, "lr": lr, "loss": m["loss"], "closs": m["closs"],
            "z_loss": m["z_loss"], "grad_norm": m["grad_norm"], "time": dt, "data_time": t_data,
            "tokens_per_sec": m["real_tokens"] / dt / world, "tflops": m["flops"] / dt / world / 1e12,
            "memory": peak_memory_mb(device), "tokens": m["tokens"], "type": batch_type}


# ------------------------------------------------------------------------------------------------------------
# the parts train() wires together, each built or called once


def _setup_precision(a: TrainArgs, device: torch.device) -> None:
    """TF32 when asked on a GPU; warnings for precisions that are slow or unscaled here; no-op flags noted."""
    if a.precision == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and a.precision in ("bf16", "fp16"):
        logger.warning("--precision %s on a CPU is slow and loses precision; use --precision fp32", a.precision)
    if a.precision == "fp16":
        logger.warning("--precision fp16 runs without loss scaling (as Lumina); bf16 is the safe choice")
    if a.cache_ann_on_disk:
        logger.info("--cache_ann_on_disk: our record index is always memory-mapped; nothing to do")


def _decide_resume(a: TrainArgs, out: Path, rank: int) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), decided on rank 0 (all ranks must agree) and checked
    before the model is built; a CheckpointError from rank 0 is raised on every rank."""
    resume: object = None
    if rank == 0:
        try:
            ckpt.remove_stale_tmp(out)  # first: it puts back a checkpoint that a crash left mid-rename
            if a.resume_path:
                resume = Path(a.resume_path)
            elif a.auto_resume:  # a damaged newest checkpoint is skipped for the one before, with a warning
                resume = ckpt.latest_usable_checkpoint(out)
            if resume is not None:
                ckpt.verify_checkpoint(resume)  # damage or code: a clear error now, not inside DCP later
        except ckpt.CheckpointError as e:
            resume = e
    resume = _broadcast(resume, rank)
    if resume is not None:
        logger.info("resuming from %s", resume)
    return resume


@dataclass
class _Model:
    """The sharded model of the run, its optimizer and what the rest of train() needs to know about it."""
    lm: ChameleonLM
    optimizer: torch.optim.Optimizer
    config: object  # ChameleonConfig
    model_dir: str  # the initial HF weights
    n_params_no_embed: int
    n_trainable: int
    partial: bool  # resuming from a --only_save_trainable checkpoint (loaded on top of its base weights)


def _build_model(a: TrainArgs, rank: int, world: int, device: torch.device, resume: Path | None) -> _Model:
    """The model built on the meta device, sharded, then materialised shard by shard; LoRA/trainable subsets
    applied; initial weights loaded unless the checkpoint holds every tensor; the optimizer attached."""
    model_dir, cfg_dict = _resolve_model_dir(a, rank, resume)
    config = config_from_dict(cfg_dict, where=f"{model_dir}/config.json")
    problem = a.export_hf and a.export_layout != "hf" and lumina_export_problem(config)
    if problem:  # known before training: per-head norms that differ have no Lumina form
        raise TrainingStopped(f"--export_layout {a.export_layout}: {problem}")
    config.max_position_embeddings = a.max_seq_len  # as Lumina: the context the model is trained for
    lm = build_chameleon_lm(config, device="meta", mask_image_logits=a.mask_image_logits,
                            z_loss_weight=a.z_loss_weight, dropout=a.dropout, loss_chunk_size=a.loss_chunk_size)
    n_params, n_params_no_embed = _count_params(lm)
    logger.info("model from %s: %.2fM parameters (%.2fM without embeddings), vocab %d, %d layers, hidden %d",
                model_dir, n_params / 1e6, n_params_no_embed / 1e6, config.vocab_size, config.num_hidden_layers,
                config.hidden_size)
    apply_lora(lm, a)  # --lora_rank: peft adapters, base weights frozen
    n_trainable = apply_trainable(lm, a.trainable, lora=a.lora_rank > 0)["trainable_params"]
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    parallelize(lm, mesh, data_parallel=a.data_parallel, precision=a.precision, grad_precision=a.grad_precision,
                checkpointing=a.checkpointing, compile=a.compile)
    lm.to_empty(device=device)
    lm.reset_nonpersistent_buffers(device)
    shard_row_masks(lm)
    partial = resume is not None and check_base_model(ckpt.read_train_state(resume), model_dir, resume)
    if resume is None or partial:  # a --only_save_trainable checkpoint goes on top of its base weights
        if sharded_loading_applies(model_dir) and not a.lora_rank:  # each rank reads only its own slices
            load_sharded_safetensors(lm, model_dir)
        else:  # .bin, or LoRA (wrapped names, adapters to initialise): rank 0 reads and broadcasts
            _load_initial_weights(lm, model_dir, rank)
    optimizer = attach_to_optimizer(build_optimizer(lm, lr=a.lr, weight_decay=a.wd,
                                                    decay_norm_and_bias=a.decay_norm_and_bias), lm)
    return _Model(lm, optimizer, config, model_dir, n_params_no_embed, n_trainable, bool(partial))


def _build_data(a: TrainArgs, rank: int, world: int, pad_id: int, global_batch: int):
    """Record indexes (one builder per machine, then a barrier) and the training data of this rank."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one builder per machine; a file lock dedups shared FSs
        for cfg_path in (a.data_config, a.val_data_config):
            if cfg_path is not None:
                build_indexes(cfg_path)
    dist.barrier()
    data = build_train_data(a.data_config, max_seq_len=a.max_seq_len, micro_batch_size=a.batch_size,
                            accum_iter=a.accum_iter, world_size=world, rank=rank, seed=a.seed,
                            length_clustering=a.length_clustering, packing=a.packing, num_workers=a.num_workers,
                            pin_mem=a.pin_mem, pad_id=pad_id, worker_ignores=parse_signals(a.exit_signals))
    if data.sampler.steps_per_epoch < 1:
        raise TrainingStopped(f"--data_config {a.data_config}: {len(data.dataset)} items make no global batch of "
                              f"{global_batch}; lower --batch_size / --accum_iter or add data")
    return data


def _restore(a: TrainArgs, resume: Path | None, m: _Model, data, type_loss: TypeLoss, *, rank: int, world: int,
             global_batch: int) -> tuple[int, int, object]:
    """(start epoch, global step, RNG state to restore at the epoch's start or None) of the run; on resume the
    model, optimizer, sampler and per-type losses are loaded from the checkpoint."""
    if resume is None:
        return 0, 0, None
    st = ckpt.load_checkpoint(resume, model=m.lm, optimizer=m.optimizer, model_keys=saved_model_keys(m.lm, m.partial))
    if st["global_batch_size"] != global_batch:
        logger.warning("the global batch changed from %d to %d since the checkpoint: the rest of the epoch is "
                       "re-batched (nothing replayed or skipped), but losses differ from the original run",
                       st["global_batch_size"], global_batch)
    data.sampler.load_state_dict(st["sampler"])
    start_epoch = st["epoch"] + 1 if st["epoch_done"] else st["epoch"]
    global_step = st["global_step"]
    type_loss.load_state_dict(st.get("type_loss", {}))
    pending_rng = ckpt.load_rng(resume, rank) if st["world_size"] == world else None
    if pending_rng is None:
        logger.warning("checkpoint written by %d ranks, now %d: RNG streams restart from the seed",
                       st["world_size"], world)
        seed_everything(a.seed + rank + 1_000_003 * global_step)
    return start_epoch, global_step, pending_rng


def _hf_export(a: TrainArgs, m: _Model, rank: int):
    """The export an epoch checkpoint runs with --export_hf: HF and/or Lumina layout (LoRA: adapter + merged)."""
    def export(path: Path) -> None:
        full = ckpt.gather_full_model_state(m.lm)
        if rank == 0:
            full = merged_hf_state(full, m.lm, path / "adapter", base=m.model_dir)  # LoRA: adapter + merged
        if rank == 0 and a.export_layout in ("hf", "both"):
            vq = _read_vq(m.model_dir)
            ckpt.save_hf(full, m.config, path, dtype=DTYPES[a.precision], vq_state_dict=vq)
        if rank == 0 and a.export_layout in ("lumina", "both"):
            save_lumina(full, m.config, path.parent / "lumina", dtype=DTYPES[a.precision], flags=vars(a))
    return export


class _Saver:
    """Writes a checkpoint of the run (model, optimizer, trainer state, RNG; the export at epoch ends)."""

    def __init__(self, a: TrainArgs, out: Path, m: _Model, data, type_loss: TypeLoss, *, rank: int, world: int,
                 global_batch: int):
        self.a, self.out, self.m, self.data, self.type_loss = a, out, m, data, type_loss
        self.rank, self.world, self.global_batch = rank, world, global_batch
        partial_saves = saved_model_keys(m.lm, a.only_save_trainable) is not None  # else it holds every tensor
        self.base_record = base_model_record(m.model_dir, partial_saves) if rank == 0 else {}

    def __call__(self, name: str, epoch: int, it: int, epoch_done: bool, global_step: int) -> Path:
        a, m, sampler = self.a, self.m, self.data.sampler
        state = {"epoch": epoch, "iter": it, "global_step": global_step, "epoch_done": epoch_done,
                 "sampler": sampler.state_dict(), "world_size": self.world, "global_batch_size": self.global_batch,
                 "steps_per_epoch": sampler.steps_per_epoch, "type_loss": self.type_loss.state_dict(),
                 **self.base_record}
        export = _hf_export(a, m, self.rank) if epoch_done and a.export_hf else None
        return ckpt.save_checkpoint(self.out, name, model=m.lm, optimizer=m.optimizer, train_state=state,
                                    args=dataclasses.asdict(a), hf_config=json.loads(m.config.to_json_string()),
                                    max_keep=a.ckpt_max_keep, export=export,
                                    model_keys=saved_model_keys(m.lm, a.only_save_trainable))


def _train_or_skip(a: TrainArgs, m: _Model, data, batches, *, epoch: int, it: int, global_step: int, spe: int,
                   skip: SkipRanges, type_loss: TypeLoss, eta: EtaClock, out: Path, world: int,
                   device: torch.device, lc: Lifecycle) -> dict | None:
    """Consumes the next global batch and trains on it (or skips it, --skip_iterations); the metrics row of a
    trained step, None for a skipped one. ``lc`` hears which phase the step is in and that it finished."""
    lc.phase("data")
    reset_peak_memory(device)
    t0 = time.perf_counter()
    where = f"step {global_step + 1} (epoch {epoch}, iter {it + 1})"
    batch_type = data.dataset.type_names[data.sampler.type_of_step(it)]
    micro = _next_global_batch(batches, a.accum_iter, where)
    t_data = time.perf_counter() - t0
    lr = lr_at(global_step, spe, lr=a.lr, min_lr=a.min_lr, warmup_epochs=a.warmup_epochs, epochs=a.epochs,
               accum_iter=a.accum_iter)
    if global_step + 1 in skip:
        logger.info("%s: skipped (--skip_iterations %s): its global batch (type %s) was consumed, no "
                    "forward, backward or update", where, skip, batch_type)
        lc.progress()
        return None
    r = _checked_train_step(m.lm, m.optimizer, micro, a=a, device=device, lr=lr, out=out, where=where,
                            n_params_no_embed=m.n_params_no_embed, phase=lc.phase)
    lc.progress()
    dt = time.perf_counter() - t0
    return {**_step_row(r, step=global_step + 1, epoch=epoch, it=it + 1, lr=lr, dt=dt, t_data=t_data, world=world,
                        device=device, batch_type=batch_type),
            "trainable_params": m.n_trainable, **type_loss.update(batch_type, r["loss"]),
            "eta": eta.update(global_step + 1, dt)}


def _evaluate(evaluator: Evaluator | None, lm: ChameleonLM, row: dict | None, *, step: int, epoch: int, it: int,
              spe: int) -> dict | None:
    """``row`` with the validation losses added when an evaluation is due after this step (a skipped step
    gets a row of its own)."""
    if evaluator is None or not evaluator.due(step, epoch_end=it == spe):
        return row
    return {**(row or {"step": step, "epoch": epoch, "iter": it, "skipped": True}), **evaluator.run(lm)}


def _log_row(metrics: MetricsWriter, row: dict | None, *, step: int, log_every: int, total_steps: int) -> None:
    """metrics.jsonl (and dashboards) every --log_every steps and after every evaluation; the console line."""
    if row is not None and (step % log_every == 0 or "val_loss" in row):
        metrics.write(row)
        if "loss" in row:
            logger.info(format_console(row, total_steps))


# ------------------------------------------------------------------------------------------------------------
# the run


def train(a: TrainArgs, rank: int, world: int, device: torch.device, lc: Lifecycle) -> int:
    """The run; returns the exit status (0, or lifecycle.EXIT_STOPPED after a stop with a checkpoint)."""
    out = Path(a.output_dir)
    _setup_precision(a, device)
    init_model_parallel(a.model_parallel_size)
    seed_everything(a.seed + rank)
    global_batch = a.batch_size * a.accum_iter * world
    logger.info("world size %d, global batch %d = batch_size %d x accum_iter %d x %d ranks", world, global_batch,
                a.batch_size, a.accum_iter, world)
    resume = _decide_resume(a, out, rank)
    m = _build_model(a, rank, world, device, resume)
    pad_id = m.config.pad_token_id if m.config.pad_token_id is not None else 0
    data = lc.watch("index build", _build_data)(a, rank, world, pad_id, global_batch)
    evaluator = _build_evaluator(a, rank, world, device, pad_id)
    skip = SkipRanges.parse(a.skip_iterations)
    type_loss = TypeLoss(a.type_loss_window)
    start_epoch, global_step, pending_rng = _restore(a, resume, m, data, type_loss, rank=rank, world=world,
                                                     global_batch=global_batch)
    save = lc.watch("checkpoint", _Saver(a, out, m, data, type_loss, rank=rank, world=world,
                                          global_batch=global_batch))
    evaluate = lc.watch("evaluation", _evaluate)
    metrics = _open_metrics(a, out, rank, resumed_step=global_step if resume is not None else None)
    samples = TrainingSamples.build(a, m.lm, rank, device, on_images=metrics.log_images)  # + to dashboards
    after_step, at_epoch_end = lc.watch("sampling", samples.after_step), lc.watch("sampling", samples.at_epoch_end)
    m.lm.train()
    last_saved = global_step if resume is not None else -1
    spe = data.sampler.steps_per_epoch
    total_steps = a.epochs * spe
    eta = EtaClock(min(total_steps, a.max_steps) if a.max_steps is not None else total_steps)
    stop = None
    logger.info("training from epoch %d, step %d of %d (%d steps per epoch)", start_epoch, global_step, total_steps, spe)
    if skip:
        logger.info("--skip_iterations: steps %s will be consumed without training", skip)
    try:
        for epoch in range(start_epoch, a.epochs):
            data.sampler.set_epoch(epoch)
            spe = data.sampler.steps_per_epoch
            it_in_epoch = data.sampler.step
            batches = _rng_neutral(data.loader) if it_in_epoch < spe else iter(())
            if pending_rng is not None:
                ckpt.restore_rng(pending_rng)
                pending_rng = None
            epoch_save_due = epoch % a.save_interval == 0 or epoch + 1 == a.epochs
            while it_in_epoch < spe:
                if stop := lc.should_stop(global_step):  # a signal, the time limit, --max_steps: all ranks agree
                    break
                row = _train_or_skip(a, m, data, batches, epoch=epoch, it=it_in_epoch, global_step=global_step,
                                     spe=spe, skip=skip, type_loss=type_loss, eta=eta, out=out, world=world,
                                     device=device, lc=lc)
                global_step += 1
                it_in_epoch += 1
                row = evaluate(evaluator, m.lm, row, step=global_step, epoch=epoch, it=it_in_epoch, spe=spe)
                _log_row(metrics, row, step=global_step, log_every=a.log_every, total_steps=total_steps)
                if (a.save_iteration_interval and it_in_epoch % a.save_iteration_interval == 0
                        and not (it_in_epoch == spe and epoch_save_due)):
                    save(ckpt.ckpt_name(epoch, it_in_epoch), epoch, it_in_epoch, False, global_step)
                    last_saved = global_step
                after_step(global_step)
            if stop:
                if last_saved != global_step and global_step > 0:
                    save(ckpt.ckpt_name(epoch, it_in_epoch), epoch, it_in_epoch, False, global_step)
                return lc.stopped(stop, global_step, ckpt.latest_checkpoint(out))
            if epoch_save_due:
                save(ckpt.ckpt_name(epoch), epoch, spe, True, global_step)
                last_saved = global_step
            at_epoch_end(global_step)
        logger.info("training done: %d steps", global_step)
        return 0
    finally:
        metrics.close()


def _read_vq(model_dir: str) -> dict:
    """The VQ model of --init_from for the epoch exports; {} (the export then holds none, as Lumina's
    releases) when it has none or cannot be read."""
    try:
        vq = read_vq_weights(Path(model_dir))
    except (ModelLoadError, OSError) as e:
        logger.warning("cannot read the VQ model of %s (%s): HF exports hold no VQ model", model_dir, e)
        return {}
    if not vq:
        logger.info("%s holds no VQ model: HF exports hold none either (as Lumina's releases)", model_dir)
    return vq


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.plan:
        return run_plan(a)
    restore_determinism = enable_determinism() if a.deterministic else None  # before CUDA is first used
    try:
        launch = detect_launch_env()
        enable_nccl_flight_recorder(a.output_dir)  # CUDA only; before the process group reads the variables
        device = init_distributed(launch, a.dist_timeout)
    except LaunchError as e:
        logging.basicConfig(level=logging.INFO)
        logger.error("%s", e)
        if restore_determinism is not None:
            restore_determinism()
        return 2
    rank, world = launch.rank, launch.world_size
    if rank == 0:
        Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    handlers = setup_logging(a.output_dir, rank)
    logger.info("launcher %s: rank %d of %d (local rank %d), master %s:%d, backend %s, device %s", launch.launcher,
                rank, world, launch.local_rank, launch.master_addr, launch.master_port, dist.get_backend(), device)
    logger.info("flags: %s", json.dumps(dataclasses.asdict(a)))
    code = 0
    lc = Lifecycle.from_args(a, rank, world, device).start()  # signals, --exit_duration_in_mins, --hang_timeout
    try:
        code = train(a, rank, world, device, lc)
    except (TrainingStopped, ckpt.CheckpointError, ModelLoadError, LaunchError, DataConfigError,
            RecordFormatError, TrainableError, LoraError, DashboardError, GenerationInputError) as e:
        logger.error("%s", e)
        code = 1
    finally:
        lc.close()
        teardown_logging(handlers)
        cleanup_distributed()
        if restore_determinism is not None:
            restore_determinism()
    return code


if __name__ == "__main__":
    sys.exit(main())
