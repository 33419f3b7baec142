#!/usr/bin/env bash
# Fetches the wheels of benchmarks/gpu_wheels.txt into .whl/ (ignored by git) for the GPU
# machine's Python 3.12 on x86-64 Linux: pure-Python ones and manylinux builds from the package
# index, and deepspeed built here from its source archive (no ops prebuilt).
#   bash benchmarks/gpu_wheels.sh [DEST]      (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
mapfile -t wanted < <(grep -v '^\s*#' benchmarks/gpu_wheels.txt | sed '/^\s*$/d')
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for req in "${wanted[@]}"; do
  name=${req%%==*}
  if [ "$name" = deepspeed ]; then
    ls "$dest"/deepspeed-*.whl >/dev/null 2>&1 \
      || "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$req" 2>&1 | sed '/is ignored/d' >&2
  else
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dest" "$req" 2>&1 | sed '/is ignored/d' >&2
  fi
done
du -sh "$dest" | cut -f1 | xargs echo "gpu wheels in $dest:"
