#!/usr/bin/env bash
# Every GPU check in one command, < 10 min on one H100/H200, one JSON:  bash bench/gpu_check.sh [OUT_DIR]
# (stages and their limits: bench/gpu_check.py --dry-run). On a box whose python3 has CUDA torch; missing packages
# come from PyPI, or, on a box without an index (a lent GPU machine), from wheels fetched beforehand where PyPI is
# reachable:  bash bench/gpu_check.sh --fetch-wheels [DIST ...]   (default: all of NEED; no torch among them: the
# box's CUDA torch is kept). The lent H200's image lacks, of NEED, these (≈ 54 MB of wheels, under a call's 64 MiB):
#   bash bench/gpu_check.sh --fetch-wheels diffusers pydantic pydantic-core annotated-types typing-inspection \
#     torchao bitsandbytes
# Carried wheels are installed into $SITE (not the box's environment, which may be read-only) and put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# import name=distribution, for everything `apexctl prepare/distill/sample/eval digits` and the benches import
NEED="diffusers=diffusers transformers=transformers tokenizers=tokenizers huggingface_hub=huggingface-hub
safetensors=safetensors accelerate=accelerate peft=peft typer=typer click=click rich=rich markdown_it=markdown-it-py
mdurl=mdurl pygments=pygments shellingham=shellingham pydantic=pydantic pydantic_core=pydantic-core
annotated_types=annotated-types typing_inspection=typing-inspection yaml=pyyaml psutil=psutil regex=regex
sklearn=scikit-learn scipy=scipy joblib=joblib threadpoolctl=threadpoolctl torchmetrics=torchmetrics
lightning_utilities=lightning-utilities PIL=pillow numpy=numpy filelock=filelock requests=requests tqdm=tqdm
packaging=packaging fsspec=fsspec torchao=torchao bitsandbytes=bitsandbytes"
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude; }
  shift
  dists=${*:-$(for pair in $NEED; do echo "${pair#*=}"; done)}
  for d in $dists; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform any -d .whl "$d"
  done
  du -sh .whl
  exit 0
fi
missing=$($PY - "$NEED" <<'PYEOF'
import importlib.util, sys
print(" ".join(p.split("=")[1] for p in sys.argv[1].split() if importlib.util.find_spec(p.split("=")[0]) is None))
PYEOF
)
SITE=${SITE:-/tmp/apexctl-site}
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -d .whl ]; then
    wheels=$(for d in $missing; do ls .whl/"$(echo "$d" | tr - _)"-*.whl 2>/dev/null || echo "no wheel for $d" >&2; done)
    [ -z "$wheels" ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" $wheels
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    $PY -m pip install -q $missing
  fi
fi
OUT=${1:-${OUT:-.}}
mkdir -p "$OUT"
PYTHONPATH=. $PY bench/gpu_check.py --out "$OUT/gpu_check.json" --work "$OUT/gpu_check_work"
