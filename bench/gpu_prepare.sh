#!/bin/bash
# Run HERE (a machine with PyPI), before a GPU call: puts into .whl/ (ignored by git) the wheels that the
# GPU machine's image lacks, for its Python 3.12 on manylinux x86_64. bench/gpu_check.sh installs them there
# with pip --no-index into a --target folder put in front of the image's packages.
#
#   bash bench/gpu_prepare.sh                            # taming-transformers and fairscale (what it lacks)
#   bash bench/gpu_prepare.sh --also transformers==5.23.0 --also tokenizers==0.23.3   # and other versions
#
# The image (the device tool's KINDS.md, read 2026-11): Python 3.12.3, torch 2.11.0+cu130, transformers
# 5.17.0, tokenizers 0.23.2, safetensors 0.8.0, numpy, pillow, pyyaml, tqdm; no taming, no fairscale, no
# network. The stack runs on torch 2.11 and transformers 5.17 (README, "Supported versions": the fast test
# subset and the CPU rehearsal of the GPU check passed with exactly those), so only the two missing
# packages travel: both are source-only on PyPI and pure Python, so they are built here as py3-none-any
# wheels, with no dependencies (they need only torch, numpy and tqdm, which the image has). --also downloads
# a binary or pure-Python wheel for cp312 manylinux x86_64 (the device README's pip download command).
# Everything that travels (the working tree plus .whl) must stay under 64 MiB; this checks .whl's share.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=48  # of the 64 MiB a device call carries; the rest is the working tree (~1.3 MiB now)
also=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --also) [[ $# -ge 2 && $2 == *==* ]] || { echo "gpu_prepare.sh: --also needs NAME==VERSION" >&2; exit 2; }
            also+=("$2"); shift 2 ;;
    *) echo "gpu_prepare.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

pin() {  # NAME -> NAME==VERSION as pinned in requirements*.txt (one place for versions)
  local line
  line=$(grep -hiE "^$1==" requirements.txt requirements-nodeps.txt | head -n 1 | awk '{print $1}')
  [[ -n $line ]] || { echo "gpu_prepare.sh: $1 is not pinned in requirements*.txt" >&2; exit 2; }
  echo "$line"
}
build=("$(pin taming-transformers)" "$(pin fairscale)")

rm -rf "$DEST"  # one version of each package: two stop the install on the device
mkdir -p "$DEST"
echo "gpu_prepare.sh: building ${build[*]} (pure Python, no dependencies)"
"$PYTHON" -m pip wheel -q --no-deps --disable-pip-version-check -w "$DEST" "${build[@]}"
if [[ ${#also[@]} -gt 0 ]]; then
  echo "gpu_prepare.sh: downloading ${also[*]} for cp312 manylinux x86_64"
  plats=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do plats+=(--platform "$p"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plats[@]}" --disable-pip-version-check -d "$DEST" "${also[@]}"
fi

for w in "$DEST"/*.whl; do  # every wheel must install on CPython 3.12 x86_64
  case "$(basename "$w")" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*x86_64.whl|*-abi3-*x86_64.whl) ;;
    *) echo "gpu_prepare.sh: $(basename "$w") does not install on CPython 3.12 x86_64" >&2; exit 1 ;;
  esac
  echo "  $(basename "$w")  $(du -k "$w" | cut -f1) KiB; needs: $(unzip -p "$w" '*.dist-info/METADATA' \
       | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' | tr '\n' ' ')"
done
size=$(du -sm "$DEST" | cut -f1)
if [[ $size -gt $LIMIT_MIB ]]; then
  echo "gpu_prepare.sh: .whl is $size MiB, over the $LIMIT_MIB MiB it may take of a device call's 64 MiB" >&2
  exit 1
fi

# The wheels install and import (with an interpreter that has torch: PYTHON, or /work-style .venv's).
py=$PYTHON
"$py" -c 'import torch' 2>/dev/null || py=.venv/bin/python
if "$py" -c 'import torch' 2>/dev/null; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --root-user-action=ignore \
    --target "$site" "$DEST"/*.whl
  PYTHONPATH="$site" "$py" -c 'import sys, taming.modules.diffusionmodules.model as t, fairscale as f; sys.exit(not all(m.__file__.startswith(sys.argv[1]) for m in (t, f)))' "$site" \
    || { echo "gpu_prepare.sh: the wheels installed but do not import (above)" >&2; exit 1; }
  echo "gpu_prepare.sh: the wheels install and import with $py"
else
  echo "gpu_prepare.sh: import check skipped: no interpreter with torch (set PYTHON)"
fi
echo "gpu_prepare.sh: $DEST ready ($size MiB). On the GPU machine: carry .whl; bash bench/gpu_check.sh installs it"
