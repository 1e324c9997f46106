"""Python client of nora's gRPC API (`NoraClient`, `AsyncNoraClient`) and the `nora` command
line (nora_client.cli). Messages: `nora_proto.v1.nora_pb2`."""

from nora_client.client import AsyncNoraClient, NoraClient, generate_request

__all__ = ["AsyncNoraClient", "NoraClient", "generate_request"]
