#!/usr/bin/env bash
# Makes what a GPU machine without network access (Python 3.12, torch and timm installed) needs to run
# benchmarks/gpu_check.py on the CIFAR-10 JPEGs, and prints the command to run there:
#   .whl/  the wheels such a machine may lack: pydantic and what it needs, at the versions this venv has
#   .gpu/  a copy of the CIFAR-10 JPEG archive (19 MB)
# Both are ignored by git. Usage: bash benchmarks/gpu_bundle.sh [path/to/cifar10-jpeg.tar.gz]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS="pydantic pydantic-core annotated-types typing-inspection typing-extensions"
rm -rf .whl && mkdir -p .whl .gpu
for name in $WHEELS; do
  version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
tarball=${1:-../shared/data/cifar10-jpeg.tar.gz}
if [ -f "$tarball" ]; then
  cp "$tarball" .gpu/
  jpegs="--jpegs .gpu/cifar10-jpeg.tar.gz"
else
  echo "gpu_bundle: no $tarball here: the check will skip time_to_94" >&2
  jpegs=""
fi
echo "copy .whl/ and .gpu/ with the checkout, then run there:"
echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi; PYTHONUNBUFFERED=1 timeout 560 python3 benchmarks/gpu_check.py $jpegs --out gpu_check.json 2>&1 | tee gpu_check.log"
