#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
