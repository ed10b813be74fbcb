#!/usr/bin/env bash
# The GPU smoke check in one line, on a machine whose python3 has CUDA torch:  bash bench/gpu_smoke.sh [OUT_DIR]
# Missing dependencies come from PyPI, or, on a machine without an index (a lent GPU box), from wheels in .whl/
# fetched beforehand where PyPI is reachable:  bash bench/gpu_smoke.sh --fetch-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NEED="diffusers pydantic pydantic-core annotated-types typing-inspection"
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for p in $NEED; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$p"
  done
  exit 0
fi
if ! $PY -c "import diffusers, pydantic" 2>/dev/null; then
  if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps .whl/*.whl; else $PY -m pip install -q $NEED; fi
fi
PYTHONPATH=. $PY bench/gpu_smoke.py --out "${1:-${OUT:-.}}/gpu_smoke.json"
