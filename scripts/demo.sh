#!/usr/bin/env bash
# Set up, build the demo model, start flambeau with it, and show a prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/flambeau ] || bash scripts/setup.sh test
.venv/bin/python examples/demo/build.py model_store >/dev/null
.venv/bin/flambeau stop >/dev/null 2>&1 || true
.venv/bin/flambeau start --model-store model_store --models demo=demo.mar --ncs --disable-token-auth
echo "POST /predictions/demo  [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]"
curl -s -H 'Content-Type: application/json' -d '[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]' \
  http://127.0.0.1:8080/predictions/demo
echo
echo "flambeau is serving on 127.0.0.1:8080 (inference), :8081 (management), :8082 (metrics)."
echo "Stop it with: .venv/bin/flambeau stop"
