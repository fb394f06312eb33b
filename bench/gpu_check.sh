#!/bin/bash
# The CUDA paths no CPU test covers, on one CUDA machine, in one table, within a global budget (6 minutes):
#
#   bash bench/gpu_check.sh                          # all checks; table.md and one log per check in $OUT
#   bash bench/gpu_check.sh --only nccl,train --out DIR
#   bash bench/gpu_check.sh --rehearse-cpu           # every check end to end on the CPU at tiny sizes (CI)
#
# Checks, in this order (fast and fundamental first):
#   nccl      nccl init and the collectives FSDP uses on every visible GPU (torchrun)
#   pinned    the trainer's DataLoader with --pin_mem: batches pinned, copied asynchronously; batches/s
#   train     bf16 FSDP steps of a ~1B config at vocabulary 65536: tokens/s, MFU, peak memory vs the planner
#   resume    finetune_solver.py bf16 --deterministic resumed from step 2 of a 4-step run: losses bitwise equal
#   generate  bench/bench_generate.py bf16: ours vs transformers generate vs a Lumina-style loop
#   pretok    pre_tokenize.py with the real-width VQGAN: whole batches vs --batch_invariant (images/s, codes)
#   encode    bench/bench_pretokenize.py: batched VQGAN encode vs the per-item Lumina loop, both strict fp32
#   compile_train     bench/bench_train_step.py --compile bf16: compiled decoder layers vs eager, tokens/s, MFU
#   compile_generate  bench/bench_generate.py --compile bf16: compiled decoding vs eager and the Lumina baselines
#                     (last: when the budget leaves no room, run them in a second call with --only)
#
# Options: --only LIST (comma-separated checks), --budget S (start no check after S seconds; default 360,
# 900 with --rehearse-cpu), --out DIR (default $OUT, else bench/out/gpu_check), --wheels DIR (default .whl:
# wheels made by bench/gpu_prepare.sh, installed with pip --no-index into a --target folder first; with
# --rehearse-cpu only when --wheels is given).
# Environment: PYTHON (default python3), HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set here.
# Exit code: 0 every check ok, 1 a check failed, timed out or was skipped, 2 bad arguments or a missing
# package (torch, transformers, taming, fairscale), 77 no CUDA GPU (nothing run). Sections: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
die2() { echo "gpu_check.sh: $*" >&2; exit 2; }

REHEARSE=0
# the checks, in order: the Check(...) lines of bench/gpu_check.py (one list to extend)
ALL=$(grep -oE '^    Check\("[a-z0-9_]+"' bench/gpu_check.py | cut -d'"' -f2 | paste -sd, -)
ONLY=$ALL
BUDGET=""
RESULTS=""
WHEELS=".whl"
WHEELS_GIVEN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --rehearse-cpu) REHEARSE=1; shift ;;
    --out) [[ $# -ge 2 ]] || die2 "--out needs a directory"; RESULTS=$2; shift 2 ;;
    --only) [[ $# -ge 2 ]] || die2 "--only needs a list, e.g. train,pretok"; ONLY=$2; shift 2 ;;
    --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die2 "--budget needs a number of seconds"; BUDGET=$2; shift 2 ;;
    --wheels) [[ $# -ge 2 ]] || die2 "--wheels needs a directory"; WHEELS=$2; WHEELS_GIVEN=1; shift 2 ;;
    *) die2 "unknown argument '$1' (see --help)" ;;
  esac
done
IFS=, read -r -a sections <<< "$ONLY"
for s in "${sections[@]}"; do
  [[ ",$ALL," == *",$s,"* ]] || die2 "--only: unknown check '$s' (${ALL//,/, })"
done

PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! err=$("$PYTHON" -c 'import torch' 2>&1); then
  die2 "$PYTHON cannot import torch, so nothing can be checked (set PYTHON to the interpreter that has it; on
the GPU machine that is python3): $(echo "$err" | tail -n 3)"
fi
if [[ $REHEARSE -eq 0 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: SKIPPED: no CUDA GPU (torch.cuda.is_available() is False with $PYTHON); nothing was run" \
       "(--rehearse-cpu runs the checks on the CPU)" >&2
  exit 77
fi

# The carried wheels (taming-transformers, fairscale, ...: bench/gpu_prepare.sh) go in front of the
# interpreter's own packages. The rehearsal installs them only when --wheels is given (to rehearse this too).
if [[ $REHEARSE -eq 0 || $WHEELS_GIVEN -eq 1 ]] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl \
    || die2 "installing the wheels in $WHEELS failed (see pip's message above)"
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH#"$PWD"}"
fi

args=(run --only "$ONLY")
[[ $REHEARSE -eq 1 ]] && args+=(--rehearse-cpu)
[[ -n $BUDGET ]] && args+=(--budget "$BUDGET")
[[ -n $RESULTS ]] && args+=(--out "$RESULTS")
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
