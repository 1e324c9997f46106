"""nora's gRPC API (proto package `nora.v1`): `nora_proto/v1/nora.proto` and its generated
Python stubs (`from nora_proto.v1 import nora_pb2, nora_pb2_grpc`), shared by `nora_server` and
`nora_client`. Regenerate with `bash scripts/gen_protos.sh`."""
