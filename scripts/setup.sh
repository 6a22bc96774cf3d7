#!/usr/bin/env bash
# Create .venv with the pinned CPU torch first (a plain `torch` requirement would pull several GB
# of CUDA wheels), then flambeau itself with the given extras.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${FLAMBEAU_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
