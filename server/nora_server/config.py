"""Server configuration: one frozen dataclass, validated on construction. `nora-serve` reads
its flag defaults from here (and the engine's from nora_runtime.config.EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback only by default; "0.0.0.0" or "::" to expose
    port: int = 50051  # 0: any free port (NoraServer.port tells which)
    # OpenAI-compatible HTTP API (http_api.py) on `host`; 0: any free port; None: off
    http_port: int | None = 8000
    metrics_port: int | None = 9400  # Prometheus /metrics over HTTP; 0: any free port; None: off
    metrics_host: str | None = None  # None: the same as host
    adapter_dir: str | None = None  # the adapter store: LoadAdapter paths resolve inside it;
    #                                 its *.safetensors files are loaded at startup
    # Limits. None: the engine's max_model_len (input: one less, leaving room for a token).
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None  # prompt + max_new_tokens
    max_concurrent_requests: int = 256  # generations in flight; beyond: RESOURCE_EXHAUSTED
    # Generations in flight per tenant. None: half of max_concurrent_requests (rounded up) when
    # the server knows two or more tenants, else no limit beyond max_concurrent_requests.
    max_tenant_requests: int | None = None
    # Longest text in UTF-8 bytes (a prompt, Tokenize text, a chat's messages together); checked
    # before tokenizing. None: max_input_tokens x the vocabulary's longest token, in bytes (a
    # longer text cannot fit the token limit).
    max_text_bytes: int | None = None
    tokenize_threads: int = 2  # tokenization and chat templating run on their own threads,
    tokenize_queue: int = 64  # with this many calls waiting at most (more: RESOURCE_EXHAUSTED)
    max_message_bytes: int = 16 << 20  # gRPC receive/send limit (inline adapters travel in it)
    grace_seconds: float = 30.0  # on SIGTERM/SIGINT, in-flight requests get this long to finish
    # TLS: PEM files. With client_ca, clients must present a certificate it signed (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Bearer tokens ("authorization: Bearer <token>" metadata; auth.py). tokens_file maps
    # tokens to tenants and roles; auth_token is the tenant "default" (role user), admin_token
    # the tenant "admin" (role admin). With any token, every RPC and /metrics need one; admin
    # RPCs (LoadAdapter, UnloadAdapter) need an admin token, or a loopback client when the
    # server has no admin token.
    tokens_file: str | None = None
    auth_token: str | None = None
    admin_token: str | None = None
    metrics_adapter_labels: int = 32  # adapter ids with their own metric label (metrics.py)
    # Streamed tokens per message, at least (vLLM's --stream-interval): the first token goes
    # at once, then messages wait until they carry this many tokens or the request ends.
    stream_interval: int = 1
    # Python's GIL switch interval (sys.setswitchinterval), ms: how long the asyncio thread
    # (gRPC and HTTP streams) may keep the GIL while the engine's loop thread waits for it.
    # None: Python's default (5 ms). Measured on the H200 (8B shape, 256 streams through gRPC,
    # 2026-12-02): 5 ms 4,791 tok/s, 1 ms 5,202, 0.2 ms 5,912.
    switch_interval_ms: float | None = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        for name in ("max_input_tokens", "max_total_tokens", "max_tenant_requests",
                     "max_text_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("max_concurrent_requests", "max_message_bytes", "tokenize_threads",
                     "stream_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tokenize_queue < 0:
            raise ValueError(f"tokenize_queue must be >= 0, got {self.tokenize_queue}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.switch_interval_ms is not None and not 0 < self.switch_interval_ms <= 1000:
            raise ValueError("switch_interval_ms must be in (0, 1000], got "
                             f"{self.switch_interval_ms}")
        if self.metrics_adapter_labels < 0:
            raise ValueError("metrics_adapter_labels must be >= 0, got "
                             f"{self.metrics_adapter_labels}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        for name in ("auth_token", "admin_token", "tokens_file", "tls_cert", "tls_key",
                     "tls_client_ca", "adapter_dir", "host", "metrics_host"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty (leave it unset for none)")
