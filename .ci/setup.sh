#!/usr/bin/env bash
# Creates .venv in the repo root and installs the pinned stack into it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
# optional features (LoRA, video, energon, hf, dashboards, plots) and the datasets package the tests write
# Hugging Face data with: CI tests them all
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-extras.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
.venv/bin/python -c "import torch, transformers, taming, fairscale; print('stack ready: torch', torch.__version__, 'transformers', transformers.__version__)"
