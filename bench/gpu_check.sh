#!/bin/bash
# The CUDA paths no CPU test covers, in one run of under 8 minutes on one CUDA GPU, and one table:
#
#   bash bench/gpu_check.sh                      # all checks, files in a temporary directory
#   bash bench/gpu_check.sh --out gpu_check_out --only train,pretok
#
#   train   bf16 FSDP training of a ~1B-parameter config at vocabulary 65536 (1 rank, nccl): tokens/s, MFU,
#           peak memory against the planner's prediction (model/training/planner.py; goal: within 15%)
#   nccl    nccl initialisation and the collectives FSDP uses, on every visible GPU (torchrun)
#   pretok  pre_tokenize.py on CUDA with the real-width VQGAN: whole batches vs --batch_invariant
#           (images/s, share of image codes equal)
#   pinned  the trainer's DataLoader with --pin_mem: batches pinned, copied asynchronously
#   resume  bf16 training on CUDA stopped at step 2 and resumed: losses bitwise equal to an uninterrupted run
#   generate  bench/bench_generate.py in bf16: image tokens/s, ours vs transformers generate vs a Lumina loop
#   encode  bench/bench_pretokenize.py --device cuda: batched VQGAN encode vs the per-item Lumina loop
#
# Each check runs under its own time limit (TRAIN_S, NCCL_S, PRETOK_S, PINNED_S, RESUME_S, GENERATE_S, ENCODE_S
# seconds: 120, 50, 80, 30, 80, 50, 60, 470 in all by default) and reports one line; a check that fails or runs
# out of time is listed as such, the others still run. Exit code: 0 all ok, 1 a check failed, 2 bad arguments, 77 skipped (no CUDA GPU).
# The sections live in bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

OUT=""
ONLY="train,nccl,pretok,pinned,resume,generate,encode"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; OUT=$2; shift 2 ;;
    --only) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --only needs a list, e.g. train,pretok" >&2; exit 2; }
            ONLY=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a sections <<< "$ONLY"
for s in "${sections[@]}"; do
  case "$s" in train|nccl|pretok|pinned|resume|generate|encode) ;;
    *) echo "gpu_check.sh: --only: unknown check '$s' (train, nccl, pretok, pinned, resume, generate, encode)" >&2
       exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: SKIPPED: no CUDA GPU (torch.cuda.is_available() is False with $PYTHON); nothing was run" >&2
  exit 77
fi

OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
results="$OUT/results.jsonl"
: > "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
echo "gpu_check: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "x", torch.cuda.device_count(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'); files in $OUT"

run_check() {  # name, time limit, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1; then :; else
    echo "gpu_check: $name exited with $? after $((SECONDS - t0)) s (limit $limit s); log: $OUT/$name.log" >&2
  fi
  grep '^GPUCHECK ' "$OUT/$name.log" >> "$results" || true
  echo "gpu_check: $name done in $((SECONDS - t0)) s"
}

for s in "${sections[@]}"; do
  case "$s" in
    train)  run_check train "${TRAIN_S:-120}" "$PYTHON" bench/gpu_check.py train --out "$OUT" ;;
    nccl)   run_check nccl "${NCCL_S:-50}" "$PYTHON" -m torch.distributed.run --nproc_per_node "$ngpu" \
              --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" bench/gpu_check.py nccl --out "$OUT" ;;
    pretok) run_check pretok "${PRETOK_S:-80}" "$PYTHON" bench/gpu_check.py pretok --out "$OUT" ;;
    pinned) run_check pinned "${PINNED_S:-30}" "$PYTHON" bench/gpu_check.py pinned --out "$OUT" ;;
    resume) run_check resume "${RESUME_S:-80}" "$PYTHON" bench/gpu_check.py resume --out "$OUT" ;;
    generate) run_check generate "${GENERATE_S:-50}" "$PYTHON" bench/gpu_check.py generate --out "$OUT" ;;
    encode) run_check encode "${ENCODE_S:-60}" "$PYTHON" bench/gpu_check.py encode --out "$OUT" ;;
  esac
done

"$PYTHON" bench/gpu_check.py table "$results" | tee "$OUT/table.md"
n_ok=$(grep -c '"ok": true' "$results" || true)
[[ "$n_ok" -eq "${#sections[@]}" ]] || exit 1
