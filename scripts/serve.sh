#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then serve: with no arguments, the built-in demo model
# and demo adapters on port 50051 (metrics on 9400). Arguments go to nora-serve (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nora-serve "$@"
