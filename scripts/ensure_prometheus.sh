#!/usr/bin/env bash
# Makes Debian's `prometheus` server binary available (used by tests/test_prometheus_scrape.py and CI).
# Idempotent: does nothing when `prometheus` is already on PATH. Installs with apt-get otherwise
# (~15 s, no service is started). Exit status 0 only when `prometheus --version` works afterwards;
# 2 when apt-get is unavailable or not permitted here (callers may skip on 2, fail on anything else).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_prometheus: 'prometheus' is missing and apt-get is not available" >&2
  exit 2
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "ensure_prometheus: 'prometheus' is missing and apt-get needs root (no password-less sudo)" >&2
    exit 2
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# Other jobs may hold the dpkg lock (parallel installs): wait for it instead of failing at once.
LOCK_WAIT=(-o DPkg::Lock::Timeout=300)
# The package lists may be absent on a fresh image; update only when the package is unknown.
if ! apt-cache show prometheus >/dev/null 2>&1; then
  $SUDO apt-get "${LOCK_WAIT[@]}" update -q
fi
$SUDO apt-get "${LOCK_WAIT[@]}" install -y -q --no-install-recommends prometheus

prometheus --version >/dev/null
