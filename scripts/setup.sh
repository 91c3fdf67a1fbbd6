#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with what MindBooth needs.
# `--test` also installs the PyTorch reference used by the tests, OpenMPI (the mpirun data-parallel test) and
# Chromium (the headless-browser check of the Streamlit demo), from Debian's packages when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  .venv/bin/python -m pip install -q -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirement.txt
fi
# oneDNN's C headers, for the CPU convolution kernel that runs on the libdnnl.so.3 MindSpore ships
# (gm/backends/cpu/kernels). Headers only: --no-deps skips the onednn runtime the package would pull in.
.venv/bin/python -m pip install -q --no-deps onednn-devel==2026.1.0
