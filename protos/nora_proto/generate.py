"""Generate the Python stubs of nora.proto with the pinned grpcio-tools.

The stubs are committed so that the server runs where grpcio-tools is not installed (it is a
dev dependency only). Which grpcio-tools generates them decides which protobuf runtimes can
import them, so the version is pinned here and in pyproject.toml's dev extra, and
`generate` refuses any other (see protos/README.md for the choice).

    python -m nora_proto.generate [OUT_ROOT]    # default: this package's parent directory
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

GRPC_TOOLS_VERSION = "1.74.0"  # protoc 31.1: gencode 6.31.1, grpcio >= 1.74
PROTOS_ROOT = Path(__file__).resolve().parent.parent  # the include root: protos/
PROTO_FILES = ("nora_proto/v1/nora.proto",)
OUTPUTS = ("nora_proto/v1/nora_pb2.py", "nora_proto/v1/nora_pb2.pyi",
           "nora_proto/v1/nora_pb2_grpc.py")


def generate(out_root: str | Path) -> list[Path]:
    """Write the stubs of PROTO_FILES under `out_root` (as `nora_proto/v1/...`); return them."""
    installed = importlib.metadata.version("grpcio-tools")
    if installed != GRPC_TOOLS_VERSION:
        raise RuntimeError(f"grpcio-tools {installed} is installed; the stubs are generated with "
                           f"{GRPC_TOOLS_VERSION} (pip install -e '.[dev]')")
    from grpc_tools import protoc

    out = Path(out_root)
    wkt = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto, shipped with it
    args = ["grpc_tools.protoc", f"-I{PROTOS_ROOT}", f"-I{wkt}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out / p for p in OUTPUTS]


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else PROTOS_ROOT):
        print(path)
