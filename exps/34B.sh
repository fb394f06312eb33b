#!/bin/bash
# Lumina-mGPT's 34B fine-tuning on this trainer: Lumina publishes only exps/7B.sh, so this is that
# script's hyper-parameters with --model_size 34B (Lumina's starting point Alpha-VLLM/Chameleon_34B_mGPT
# when INIT_FROM is empty). Same environment variables and launchers as exps/7B.sh:
#
#   srun -n32 --ntasks-per-node=8 --gres=gpu:8 bash exps/34B.sh        # SLURM: one task per GPU
#   LAUNCHER=torchrun NNODES=1 NPROC_PER_NODE=8 bash exps/34B.sh        # one node with torchrun
#   DATA_CONFIG=my.yaml OUTPUT_DIR=output/34B-run2 bash exps/34B.sh --epochs 1   # extra flags win
#   DRY_RUN=1 bash exps/34B.sh                                          # print the command, run nothing
#   PLAN=1 NNODES=4 bash exps/34B.sh                                    # memory/compute plan, see exps/7B.sh
#   EXIT_DURATION_IN_MINS=1410 srun ... bash exps/34B.sh               # checkpoint and exit 75 after 23.5 h
#   COMPILE=1 srun -n32 --ntasks-per-node=8 --gres=gpu:8 bash exps/34B.sh   # compiled layers, see exps/7B.sh
#
# Model parallelism: Lumina runs 34B with --model_parallel_size 2 (fairscale tensor parallel). This trainer
# has no tensor parallelism (mp > 1 is an error), so it runs mp 1: FSDP shards the 34B parameters, gradients
# and AdamW state over all GPUs (about 34e9 * 16 bytes / #GPUs, i.e. 17 GB each on 32 GPUs) plus
# activations; with 80 GB GPUs, --batch_size 8 at 4096 tokens fits with --checkpointing. If it does not on
# yours, lower --batch_size and raise --accum_iter to keep the global batch.
set -euo pipefail
export OUTPUT_DIR=${OUTPUT_DIR:-output/34B}
exec bash "$(dirname "$0")/7B.sh" --model_size 34B "$@"   # later flags win over 7B.sh's --model_size 7B
