#!/usr/bin/env bash
# Test each contrib distribution (plugins/contrib/<name>/) in a virtual environment of its own,
# .venv-contrib/<name>: the pinned CPU torch first (a plain `torch` requirement would pull the
# CUDA wheels), then flambeau from the repository root (editable), then the distribution itself
# as users get it (a built wheel, entry points and all) with its test extras, then its tests.
# Arguments name distributions; none means all. The TorchServe compatibility tests pack their
# archives with the real torch-model-archiver, kept in .venv-contrib/real-archiver because the
# compat package's own torch-model-archiver takes that name in its environment.
# FLAMBEAU_FRESH_VENV=1 rebuilds the environments; PYTEST_ADDOPTS passes options to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
torch_version=${FLAMBEAU_TORCH_VERSION:-2.13.0}

if [ $# -gt 0 ]; then
  dists=("$@")
else
  dists=()
  for dir in plugins/contrib/*/; do
    [ -f "$dir/pyproject.toml" ] && dists+=("$(basename "$dir")")
  done
fi

make_venv() {
  local dir=$1
  if [ "${FLAMBEAU_FRESH_VENV:-0}" = 1 ]; then rm -rf "$dir"; fi
  if [ ! -x "$dir/bin/python" ]; then
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
  fi
}

archiver_env=.venv-contrib/real-archiver
make_venv "$archiver_env"
"$archiver_env/bin/python" -m pip install -q "torch-model-archiver==0.12.0"
export REAL_TORCH_MODEL_ARCHIVER="$root/$archiver_env/bin/torch-model-archiver"

failed=()
for name in "${dists[@]}"; do
  dist=plugins/contrib/$name
  env=.venv-contrib/$name
  if [ ! -f "$dist/pyproject.toml" ]; then
    echo "test-contrib: no distribution at $dist" >&2
    exit 2
  fi
  echo "== $name ($env)"
  make_venv "$env"
  "$env/bin/python" -m pip install -q "torch==$torch_version"
  "$env/bin/python" -m pip install -q -e "$root" "$root/$dist[test]"
  # Same version number as an earlier run: force the rebuild so the tests see this checkout,
  # from a clean build/ (setuptools would otherwise package files deleted since).
  rm -rf "$dist/build"
  "$env/bin/python" -m pip install -q --force-reinstall --no-deps "$root/$dist"
  if ! (cd "$dist" && "$root/$env/bin/python" -m pytest -p no:cacheprovider); then
    failed+=("$name")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "test-contrib: failed: ${failed[*]}" >&2
  exit 1
fi
