#!/usr/bin/env bash
# Regenerate the Python stubs of protos/nora_proto/v1/nora.proto (nora_pb2.py, .pyi, _grpc.py)
# with the grpcio-tools version pinned in pyproject.toml's dev extra (see protos/README.md for
# why that version). tests/test_protos.py fails when the committed stubs differ from this output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m nora_proto.generate
