#!/usr/bin/env bash
# Install what `make demo` and `make test` need: the .venv with the pinned torch/torchvision, this
# package with its dev extras, and the Debian package dataset-fashion-mnist (original IDX files).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: Python >= 3.10 is needed (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.10+" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || {
    echo "error: could not create .venv; on Debian install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  }
fi

stamp=.venv/.simclrv2-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q $TORCH_PIN
  .venv/bin/python -m pip install -q -e ".[dev,tensorboard]"
  touch "$stamp"
fi

if [ ! -d "$FMNIST_DIR" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is not installed at $FMNIST_DIR and this is not a root Debian machine;"
    echo "      install it with 'sudo apt-get install dataset-fashion-mnist', or let the demo download it"
    echo "      with torchvision (needs a network): make demo DEMO_ARGS=common.download=true"
  fi
fi
