#!/usr/bin/env bash
# Every GPU path of the system in one command on one bare H100/H200 (issue 14), within 8 minutes:
# the suite's GPU tests, fp16 loss scaling and bf16 through DeepSpeed, xattn_scores and the
# sharded evaluator at the paper's sizes, and the training step against the reference's. It
# installs .whl/ (made here by benchmarks/gpu_wheels.sh) into a temporary folder, runs from this
# checkout without Ray or s3fs, prints one table and writes it to $OUT when that is set.
#   bash benchmarks/gpu_wheels.sh && bash benchmarks/gpu_check.sh --dry-run   # on the CPU machine
#   bash benchmarks/gpu_check.sh                                              # on the GPU machine
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then
  exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py --dry-run "${@:2}"
fi
PY=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
if ls .whl/*.whl >/dev/null 2>&1; then  # else deepspeed and webdataset must be installed already
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed (run benchmarks/gpu_wheels.sh on the CPU machine)" >&2; exit 1; }
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The steps share 450 s (their own limits inside); the outer limit catches a hang of the runner.
exec timeout 475 "$PY" benchmarks/gpu_check.py --limit 450 "$@"
