"""`nora-serve`: serve a model (default: SmolLM2-135M-Instruct with its demo adapters) over gRPC
and an OpenAI-compatible HTTP API.

Every flag has an environment variable: --max-input-tokens is NORA_MAX_INPUT_TOKENS, and so on
(flags win). Defaults come from EngineConfig and ServerConfig. Prefer the environment for
tokens (NORA_AUTH_TOKEN, NORA_ADMIN_TOKEN) or a tokens file: command lines are visible to
other users. The server listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import threading

from nora_runtime.config import EngineConfig
from nora_server.app import serve
from nora_server.auth import Auth
from nora_server.config import ServerConfig

# After "nora: stopped", the process exits within this many seconds even if a worker thread is
# stuck in a call that never returns (say, a read of a named pipe): the interpreter's exit
# would wait for it forever.
EXIT_SECONDS = 5.0

ENGINE_FLAGS = {  # EngineConfig field -> help
    "model": "checkpoint directory, hub id or .gguf file (default: SmolLM2-135M-Instruct)",
    "device": "auto (cuda if available), cuda, cuda:N or cpu",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32",
    "mode": "activation mode: replace (the rational is the activation) or residual "
            "(exact base model; adapters add a bounded change)",
    "groups": "rational groups of the coefficient table",
    "max_adapters": "adapter slots resident at once",
    "max_inline_adapters": "of the slots, those inline adapters (sent as bytes in requests) "
                           "may take (none: a quarter)",
    "max_lora_adapters": "LoRA / NoRA++ adapters resident at once (rows of the LoRA weight "
                         "pool, allocated at start; 0: NoRA only)",
    "max_lora_rank": "highest LoRA rank served",
    "lora_target_modules": "projections LoRA adapters may adapt, comma-separated (the pool "
                           "holds factors for these only)",
    "max_num_seqs": "running sequences at most (batch size)",
    "max_num_batched_tokens": "token budget of one engine step",
    "max_model_len": "prompt + generated tokens of one sequence",
    "kv_memory_fraction": "GPU: fraction of free memory given to the KV cache",
    "kv_cache_tokens_cpu": "CPU: KV cache size in tokens (none: from the model and 10%% of "
                           "available memory, at most 2 GiB)",
    "cuda_graphs": "capture decode steps in CUDA graphs on GPU",
    "seed": "seed for requests without one of their own",
    "tensor_parallel_size": "processes (one per device) that split the model, Megatron style "
                            "(gloo on the CPU, NCCL on GPUs)",
}
SERVER_FLAGS = {  # ServerConfig field -> help
    "host": "address to listen on (0.0.0.0 or :: to expose the server to the network)",
    "port": "gRPC port (0: any free port)",
    "http_port": "OpenAI-compatible HTTP API port, on --host (0: any free port; off: none)",
    "metrics_port": "Prometheus /metrics HTTP port (off: none)",
    "metrics_host": "address /metrics listens on (default: --host)",
    "adapter_dir": "adapter store: LoadAdapter paths resolve inside it; its *.safetensors "
                   "files are loaded at startup under their names",
    "max_input_tokens": "longest prompt accepted, in tokens (default: max model length - 1)",
    "max_total_tokens": "prompt + max_new_tokens at most (default: max model length)",
    "max_concurrent_requests": "generations in flight at most; more get RESOURCE_EXHAUSTED",
    "max_tenant_requests": "generations in flight per tenant (default: half of "
                           "--max-concurrent-requests with two or more tenants, else all)",
    "max_text_bytes": "longest prompt, Tokenize text or chat in UTF-8 bytes (default: "
                      "max input tokens x the longest token)",
    "tokenize_threads": "threads for tokenizing and chat templating",
    "tokenize_queue": "tokenizing calls waiting at most; more get RESOURCE_EXHAUSTED",
    "max_message_bytes": "largest gRPC message (inline adapters travel in one)",
    "grace_seconds": "on SIGTERM/SIGINT, how long in-flight requests get to finish",
    "tls_cert": "TLS certificate chain (PEM); with --tls-key, serve TLS",
    "tls_key": "TLS private key (PEM)",
    "tls_client_ca": "require client certificates signed by this CA (mTLS)",
    "tokens_file": "bearer tokens, one 'TOKEN TENANT ROLE' a line (role user or admin); "
                   "every RPC and /metrics then need one of them",
    "auth_token": "a bearer token of tenant 'default', role user (prefer NORA_AUTH_TOKEN)",
    "admin_token": "a bearer token of tenant 'admin', role admin: LoadAdapter/UnloadAdapter "
                   "require an admin (without one: loopback clients only) "
                   "(prefer NORA_ADMIN_TOKEN)",
    "metrics_adapter_labels": "adapter ids with their own metrics label; later ones count "
                              "as 'other'",
    "stream_interval": "streamed tokens per message, at least (the first token goes at once): "
                       "fewer messages, less host time per token under load",
    "switch_interval_ms": "Python's GIL switch interval in ms: how long the thread serving "
                          "streams may hold the GIL while the engine thread waits "
                          "(Python's own default is 5)",
}
OFF = ("off", "none", "")


def _parser_for(annotation: str):
    """A str -> value converter for a dataclass field's annotation (a string here)."""
    if annotation.startswith("tuple"):
        def names(text: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in text.split(",") if x.strip())

        names.__name__ = "comma-separated list"
        return names
    kind = float if "float" in annotation else int if "int" in annotation else str
    optional = "None" in annotation

    def convert(text: str):
        # Only numbers can be switched off by word: a token or TLS file given as "" or "off"
        # (say, an unset secret in a deployment) must fail in ServerConfig, not mean "no auth".
        if optional and kind is not str and text.lower() in OFF:
            return None
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


def _env_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _add_flags(parser: argparse.ArgumentParser, cls, helps: dict[str, str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, help_text in helps.items():
        field = fields[name]
        flag, env = "--" + name.replace("_", "-"), "NORA_" + name.upper()
        default = field.default
        if field.type == "bool":
            if env in os.environ:
                default = _env_bool(os.environ[env])
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{help_text} [{env}]")
            continue
        convert = _parser_for(field.type)
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except ValueError:
                parser.error(f"{env}={os.environ[env]!r} is not a valid {convert.__name__}")
        shown = "(none)" if default is None else \
            ",".join(default) if isinstance(default, tuple) else default
        secret = name.endswith("token")
        parser.add_argument(flag, dest=name, type=convert, default=default,
                            help=f"{help_text} [{env}; default: "
                                 f"{'(hidden)' if secret and default else shown}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nora-serve", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_flags(parser.add_argument_group("model and engine"), EngineConfig, ENGINE_FLAGS)
    _add_flags(parser.add_argument_group("server"), ServerConfig, SERVER_FLAGS)
    parser.add_argument("--log-level", default=os.environ.get("NORA_LOG_LEVEL", "INFO"),
                        help="logging level [NORA_LOG_LEVEL; default: INFO]")
    return parser


def configs(argv: list[str] | None = None) -> tuple[ServerConfig, EngineConfig, str]:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        engine = EngineConfig(**{k: args[k] for k in ENGINE_FLAGS})
        server = ServerConfig(**{k: args[k] for k in SERVER_FLAGS})
    except ValueError as exc:
        parser.error(str(exc))
    if server.adapter_dir is not None and not os.path.isdir(server.adapter_dir):
        parser.error(f"--adapter-dir {server.adapter_dir!r} is not a directory")
    try:
        Auth.from_config(server)  # a malformed tokens file stops the server here
    except ValueError as exc:
        parser.error(str(exc))
    return server, engine, args["log_level"]


def main(argv: list[str] | None = None) -> None:
    server, engine, level = configs(argv)
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if server.switch_interval_ms is not None:
        sys.setswitchinterval(server.switch_interval_ms / 1e3)
    code: int | str | None = 0
    try:
        _run(serve(server, engine))
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        _exit_soon(1)
        raise
    _exit_soon(code)
    sys.exit(code)


def _run(main_coroutine) -> None:
    """asyncio.run without its wait for the default executor's threads at the end (a stuck
    one would hang the exit; nora's own workers are daemon threads)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main_coroutine)
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def _exit_soon(code: int | str | None) -> None:
    """Exit with `code` in EXIT_SECONDS at the latest, whatever non-daemon thread is stuck."""
    status = code if isinstance(code, int) else (0 if code is None else 1)

    def hard_exit() -> None:
        logging.getLogger("nora_server").warning(
            "a worker thread is stuck; exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(EXIT_SECONDS, hard_exit)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    main()
