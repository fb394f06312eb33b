#!/bin/bash
# Lumina-mGPT's 7B fine-tuning (lumina_mgpt/exps/7B.sh) with its hyper-parameters, on this trainer.
#
#   srun -n32 --ntasks-per-node=8 --gres=gpu:8 bash exps/7B.sh        # SLURM: one task per GPU
#   LAUNCHER=torchrun NNODES=1 NPROC_PER_NODE=8 bash exps/7B.sh        # one node with torchrun
#   DATA_CONFIG=my.yaml OUTPUT_DIR=output/7B-run2 bash exps/7B.sh --epochs 1   # extra flags win
#   DRY_RUN=1 bash exps/7B.sh                                          # print the command, run nothing
#   PLAN=1 NNODES=4 bash exps/7B.sh                                    # memory/compute plan for 4 x 8 GPUs
#   EXIT_DURATION_IN_MINS=1410 srun ... bash exps/7B.sh               # stop with a checkpoint after 23.5 h
#
# Stops (README "On a cluster with time limits and preemption"): SIGTERM/SIGUSR1 (scancel, preemption,
# #SBATCH --signal) make the trainer checkpoint at the next step and exit 75, which this script passes on
# (requeue on it); EXIT_DURATION_IN_MINS stops it the same way after that many minutes. srun signals every
# process of the step, so this shell waits for the trainer and tee ignores the signal (the log stays whole);
# torchrun's agent ignores SIGUSR1 (its workers get it from SLURM) and forwards SIGTERM.
#   COMPILE=1 srun -n32 --ntasks-per-node=8 --gres=gpu:8 bash exps/7B.sh   # each decoder layer torch.compile'd
#
# COMPILE=1 adds --compile (torchtitan's per-block compile: the first step compiles, later steps run fused
# kernels; checkpoints and resume are the same as without; see bench/RESULTS.md for what it measured).
# PLAN=1 prints finetune_solver.py --plan for these flags (no GPU, data or weights needed; DATA_CONFIG may be
# unset) on WORLD_SIZE GPUs, default SLURM_NTASKS, else NNODES * NPROC_PER_NODE (1 x 8); GPU_MEMORY_GB
# (80), GPU (H100) and MFU (0.4) set the verdict and the throughput; PLAN_JSON=1 prints one JSON object.
#
# INIT_FROM: HF-format Chameleon dir or hub id (e.g. facebook/chameleon-7b, or a Lumina-mGPT checkpoint).
# Empty (the default, as in Lumina): the run makes Lumina's starting point in OUTPUT_DIR/starting_point
# from Alpha-VLLM/Chameleon_7B_mGPT with the image-code rows of lm_head zeroed (needs the network once).
# Hyper-parameters are Lumina's script's: 2 epochs, constant lr 2e-5 after a 0.01-epoch warmup
# (min_lr = lr), wd 0.1, clip 4, dropout 0.05, z-loss 1e-5, 8 items x 4096 tokens per GPU, image logits
# unmasked (text-to-image training). Precision: Lumina's defaults, bf16 compute with fp32 gradient
# reduction, FSDP full shard, activation checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."

lr=2e-5
wd=0.1
dropout=0.05
z_loss_weight=1e-5

INIT_FROM=${INIT_FROM:-}
if [[ -n "${PLAN:-}" ]]; then DATA_CONFIG=${DATA_CONFIG:-}; else
  DATA_CONFIG=${DATA_CONFIG:?set DATA_CONFIG to your data config YAML, see the README section on the data config}
fi
OUTPUT_DIR=${OUTPUT_DIR:-output/7B}
LAUNCHER=${LAUNCHER:-python}   # python (srun or a single process) | torchrun
PYTHON=${PYTHON:-python}

args=(
  --model_size 7B
  --batch_size 8
  --accum_iter 1
  --epochs 2
  --warmup_epochs 0.01
  --lr "$lr"
  --min_lr "$lr"
  --wd "$wd"
  --clip_grad 4
  --cache_ann_on_disk
  --num_workers 8
  --output_dir "$OUTPUT_DIR"
  --save_iteration_interval 1000
  --checkpointing
  --max_seq_len 4096
  --unmask_image_logits
  --dropout "$dropout"
  --z_loss_weight "$z_loss_weight"
  --model_parallel_size 1
  --data_parallel fsdp
  --precision bf16
  --grad_precision fp32
)
if [[ -n "$INIT_FROM" ]]; then args+=(--init_from "$INIT_FROM"); fi
if [[ -n "${EXIT_DURATION_IN_MINS:-}" ]]; then args+=(--exit_duration_in_mins "$EXIT_DURATION_IN_MINS"); fi
if [[ -n "${COMPILE:-}" && "${COMPILE}" != 0 ]]; then args+=(--compile); fi
if [[ -n "$DATA_CONFIG" ]]; then args+=(--data_config "$DATA_CONFIG"); fi

if [[ -n "${PLAN:-}" ]]; then  # one process prints the plan for the whole cluster shape, then stops
  world=${WORLD_SIZE:-${SLURM_NTASKS:-$(( ${NNODES:-1} * ${NPROC_PER_NODE:-8} ))}}
  full=("$PYTHON" finetune_solver.py "${args[@]}" --plan --world_size "$world" --gpu_memory_gb "${GPU_MEMORY_GB:-80}"
        --gpu "${GPU:-H100}" --mfu "${MFU:-0.4}")
  if [[ -n "${PLAN_JSON:-}" ]]; then full+=(--json); fi
  full+=("$@")
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${full[@]}"; echo; exit 0; fi
  exec "${full[@]}"
fi

if [[ "$LAUNCHER" == torchrun ]]; then  # --shutdown_timeout: how long workers get to checkpoint after SIGTERM
  cmd=(torchrun --shutdown_timeout "${SHUTDOWN_TIMEOUT:-300}" --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-8}" --node_rank "${NODE_RANK:-0}"
       --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" finetune_solver.py)
else  # under srun every task runs this line; finetune_solver.py reads SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST
  cmd=("$PYTHON" -u finetune_solver.py)
fi
full=("${cmd[@]}" "${args[@]}" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${full[@]}"; echo
  exit 0
fi
mkdir -p "$OUTPUT_DIR"
# a stop signal waits for the trainer (a trap runs after the command ends); its exit status (75: stopped with a
# checkpoint) becomes this script's through pipefail + set -e
trap 'echo "exps/7B.sh: stop signal; the trainer checkpoints at the next step and exits" >&2' TERM USR1
if [[ "$LAUNCHER" == torchrun ]]; then
  (trap '' USR1; exec "${full[@]}") 2>&1 | (trap '' TERM USR1; exec tee -a "$OUTPUT_DIR/output.log")
else
  "${full[@]}" 2>&1 | (trap '' TERM USR1; exec tee -a "$OUTPUT_DIR/output.log")
fi
echo "exp name: $(basename "$OUTPUT_DIR")"
