#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with what MindBooth needs.
# `--test` also installs the PyTorch reference used by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirement.txt
fi
