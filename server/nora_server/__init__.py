"""nora's gRPC server: `nora_server.app.NoraServer` serves an `nora_runtime.engine.Engine`
over grpc.aio (API: protos/nora_proto/v1/nora.proto) with health checking, reflection, TLS,
bearer tokens and Prometheus metrics; `nora-serve` (nora_server.cli) is its command line."""

__version__ = "0.1.0"
