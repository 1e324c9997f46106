"""The committed gRPC stubs are what the pinned grpcio-tools generates from nora.proto today."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nora_proto import generate

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) is not installed")
    for fresh in generate.generate(tmp_path):
        rel = fresh.relative_to(tmp_path)
        committed = generate.PROTOS_ROOT / rel
        assert committed.exists(), f"{rel} is missing: run bash scripts/gen_protos.sh"
        assert committed.read_text() == fresh.read_text(), (
            f"{rel} is stale against nora.proto: run bash scripts/gen_protos.sh")


def test_pyproject_pins_the_generator() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"grpcio-tools[^"]*"', pyproject) == [
        f'"grpcio-tools=={generate.GRPC_TOOLS_VERSION}"']
    # The gencode's protobuf version is the floor of the supported runtime range.
    gencode = re.search(r"Protobuf Python Version: (\S+)",
                        (generate.PROTOS_ROOT / generate.OUTPUTS[0]).read_text()).group(1)
    assert f'"protobuf>={gencode},<8"' in pyproject
