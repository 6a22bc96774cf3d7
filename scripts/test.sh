#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite with pytest, then the contrib packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/pytest ] || [ "${FLAMBEAU_FRESH_VENV:-0}" = 1 ]; then
  bash scripts/setup.sh dev
fi
.venv/bin/python -m pytest "$@"
