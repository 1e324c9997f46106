#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then serve: with no arguments, the default model
# (SmolLM2-135M-Instruct) and its demo adapters on port 50051 (OpenAI-compatible HTTP on 8000,
# metrics on 9400). Arguments go to nora-serve (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nora-serve "$@"
