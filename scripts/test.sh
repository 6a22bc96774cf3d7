#!/usr/bin/env bash
# Set up .venv (if needed), run the whole test suite with pytest, then each contrib
# distribution's tests in an environment of its own (scripts/test-contrib.sh).
# Arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/pytest ] || [ "${FLAMBEAU_FRESH_VENV:-0}" = 1 ]; then
  bash scripts/setup.sh dev
fi
.venv/bin/python -m pytest "$@"
if [ "${FLAMBEAU_SKIP_CONTRIB:-0}" != 1 ]; then
  bash scripts/test-contrib.sh
fi
