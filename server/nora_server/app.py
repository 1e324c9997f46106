"""The server process: gRPC (nora.v1 + grpc.health.v1 + reflection), the OpenAI-compatible HTTP
API (http_api.py), /metrics, lifecycle.

`NoraServer` listens before the model is loaded: health says NOT_SERVING and nora RPCs answer
UNAVAILABLE until `attach(engine)`, then SERVING. `stop()` drains: health NOT_SERVING, new
RPCs refused, in-flight ones given the grace period, then cancelled (which aborts their engine
requests). `serve()` is all of that for `nora-serve`, stopping on SIGTERM or SIGINT.

Health checking and reflection come from grpcio-health-checking and grpcio-reflection. Where
those packages are missing or fail to import (a machine with grpcio but nothing else
installable; a version that does not match grpcio raises at import), the server still serves
nora.v1 and logs that health checking or reflection is off. The same holds for the HTTP API
and its packages (starlette, uvicorn).

Exposure: the server listens on 127.0.0.1 unless told otherwise (`host`), /metrics on the same
host (`metrics_host`). The gRPC port is bound exclusively (no SO_REUSEPORT: a second server on
the same port fails instead of sharing the traffic at random). With auth on, /metrics needs a
bearer token as the RPCs do, over HTTPS when the server has TLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from nora_proto.v1 import nora_pb2, nora_pb2_grpc
from nora_runtime.checkpoint import MissingModelPackages
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine, EngineStats
from nora_server.auth import Auth, AuthInterceptor, server_credentials
from nora_server.config import ServerConfig
from nora_server.metrics import Metrics
from nora_server.rpc import DecodeInterceptor
from nora_server.service import NoraService

log = logging.getLogger("nora_server")

# NoRA adapters for the default model, trained by benchmarks/demo_adapters.py; preloaded when
# the default model is served without an --adapter-dir
DEMO_ADAPTER_DIR = Path(__file__).parent / "demo_adapters"
SERVICE_NAME = nora_pb2.DESCRIPTOR.services_by_name["Nora"].full_name  # "nora.v1.Nora"


class ListenError(Exception):
    """A port the server cannot listen on (in use, or an address it cannot bind)."""


class NoraServer:
    """One gRPC server (and its /metrics endpoint) for one engine."""

    def __init__(self, config: ServerConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.auth = Auth.from_config(config)  # ValueError for a malformed tokens file
        self.metrics = Metrics(self._stats, adapter_labels=config.metrics_adapter_labels,
                               model=self._model)
        self.service = NoraService(config, self.metrics, auth=self.auth)
        self._pending_engine = engine
        self._server: grpc.aio.Server | None = None
        self._health = None  # grpc_health's servicer, when the package is there
        self._http = None  # http_api.HttpApi, when serving HTTP
        self.port: int | None = None  # bound ports, once started
        self.http_port: int | None = None
        self.metrics_port: int | None = None

    def _stats(self) -> EngineStats | None:
        engine = self.service.engine
        return None if engine is None else engine.stats()

    def _model(self) -> tuple[str, str] | None:
        engine = self.service.engine
        return None if engine is None else (engine.info.name, engine.info.mode)

    def _count(self, code: str) -> Callable[[str], None]:
        return lambda method: self.metrics.rpcs.labels(method.rsplit("/", 1)[-1], code).inc()

    async def start(self) -> None:
        """Listen (gRPC, then /metrics). ListenError when a port cannot be bound (nothing is
        left listening then)."""
        c = self.config
        interceptors = []
        if self.auth.enabled:
            interceptors.append(AuthInterceptor(self.auth,
                                                on_reject=self._count("UNAUTHENTICATED")))
        interceptors.append(DecodeInterceptor(on_error=self._count("INVALID_ARGUMENT")))
        options = [("grpc.max_receive_message_length", c.max_message_bytes),
                   ("grpc.max_send_message_length", c.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a port in use is an error, not shared
        self._server = server = grpc.aio.server(interceptors=interceptors, options=options)
        nora_pb2_grpc.add_NoraServicer_to_server(self.service, server)
        names = [SERVICE_NAME]
        self._health, health_name = await _add_health(server)
        names += [health_name] if health_name else []
        _add_reflection(server, names)
        host = f"[{c.host}]" if ":" in c.host and not c.host.startswith("[") else c.host
        address = f"{host}:{c.port}"
        try:
            if c.tls_cert:
                creds = server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise ListenError(f"cannot listen on {address} (gRPC): the port is in use or the "
                              f"address is not this machine's ({exc})") from exc
        if not self.port:  # older grpcio report a failed bind as port 0
            raise ListenError(f"cannot listen on {address} (gRPC): the port is in use or the "
                              "address is not this machine's")
        await server.start()
        if c.http_port is not None:
            try:
                await self._start_http()
            except ListenError:
                await server.stop(0)
                raise
        if c.metrics_port is not None:
            metrics_host = c.metrics_host or c.host
            try:
                self.metrics_port = self.metrics.serve(
                    c.metrics_port, metrics_host,
                    authorize=(lambda t: self.auth.lookup(t) is not None)
                    if self.auth.enabled else None,
                    tls=(c.tls_cert, c.tls_key) if c.tls_cert else None,
                    state=self.service.state)
            except OSError as exc:
                await server.stop(0)
                if self._http is not None:
                    await self._http.stop(0)
                raise ListenError(f"cannot listen on {metrics_host}:{c.metrics_port} (/metrics): "
                                  f"{exc.strerror or exc}") from exc
        if self._pending_engine is not None:
            await self.attach(self._pending_engine)

    async def _start_http(self) -> None:
        c = self.config
        try:
            from nora_server.http_api import HttpApi
        except ImportError as exc:
            log.warning("the OpenAI-compatible HTTP API is off: %s is not installed "
                        "(pip install starlette uvicorn)", exc.name)
            return
        except Exception as exc:  # a broken install must not keep gRPC from serving
            log.warning("the OpenAI-compatible HTTP API is off: its packages failed to import "
                        "(%s: %s)", type(exc).__name__, exc)
            return
        http = HttpApi(self.service, self.auth)
        try:
            self.http_port = await http.start(
                c.host, c.http_port, tls=(c.tls_cert, c.tls_key) if c.tls_cert else None,
                client_ca=c.tls_client_ca, grace=c.grace_seconds)
        except OSError as exc:
            raise ListenError(f"cannot listen on {c.host}:{c.http_port} (HTTP): "
                              f"{exc.strerror or exc}") from exc
        self._http = http

    async def attach(self, engine: Engine) -> None:
        """Serve `engine` (loaded and started) from now on; health turns SERVING."""
        await self.service.prepare(engine)
        self.service.engine = engine
        await self._set_health(serving=True)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace`
        seconds (default: config.grace_seconds), cancel what is left."""
        grace = self.config.grace_seconds if grace is None else grace
        self.service.accepting = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        # While generations are in flight the listeners stay open, so that a new call gets our
        # own UNAVAILABLE ("shutting down": clients retry it elsewhere) rather than whatever a
        # closing transport says (gRPC answered CANCELLED when a call raced its stop).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.service.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        grace = max(0.0, deadline - loop.time())
        stopping = []
        if self._server is not None:
            stopping.append(self._server.stop(grace))
        if self._http is not None:
            stopping.append(self._http.stop(grace))
        await asyncio.gather(*stopping)  # both edges drain at once, within one grace period
        self.metrics.close()
        self.service.close()

    async def _set_health(self, serving: bool) -> None:
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):  # "" = the server as a whole
            await self._health.set(name, status)


async def _add_health(server: grpc.aio.Server):
    """grpc.health.v1 with every service NOT_SERVING; (servicer, service name) or (None, None)
    without grpcio-health-checking."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        log.warning("grpcio-health-checking is not installed: no grpc.health.v1 service")
        return None, None
    except Exception as exc:  # e.g. a version newer than grpcio raises RuntimeError
        log.warning("grpcio-health-checking failed to import (%s: %s): no grpc.health.v1 "
                    "service", type(exc).__name__, exc)
        return None, None
    servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _add_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        log.warning("grpcio-reflection is not installed: no server reflection")
        return
    except Exception as exc:  # e.g. a version newer than grpcio raises RuntimeError
        log.warning("grpcio-reflection failed to import (%s: %s): no server reflection",
                    type(exc).__name__, exc)
        return
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)


# ---- nora-serve ----------------------------------------------------------------------------


def preload_adapters(engine: Engine, directory: str | Path) -> list[str]:
    """The adapters of `directory` (the adapter store) at startup; return their ids. A durable
    store was restored by the engine already (its manifest, then new files: registry.restore).
    Otherwise (the demo adapters' read-only directory) load every `*.safetensors` file under
    its file name without the suffix, memory-only and pinned. A file that fails is logged and
    skipped."""
    if engine.registry.store is not None:
        return list(engine.restored_adapters)
    loaded = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            engine.load_adapter(path.stem, path.name)
        except Exception as exc:  # one bad file must not keep the others from serving
            log.error("adapter %s not loaded: %s", path.name, exc)
        else:
            loaded.append(path.stem)
    return loaded


async def _load_engine(engine_config: EngineConfig, adapter_dir: str | None,
                       stop: asyncio.Event, *, durable: bool = True) -> Engine | None:
    """Build and start the engine on a daemon thread (so that a signal during a long load
    still exits at once); None if `stop` was set first."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Engine] = loop.create_future()

    def build() -> None:
        try:
            engine = Engine(engine_config, adapter_store=adapter_dir,
                            durable_adapters=durable).start()
        except BaseException as exc:  # handed to the event loop, which re-raises it
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, engine)

    threading.Thread(target=build, name="nora-load", daemon=True).start()
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([done, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    return done.result() if done.done() else None


def _say(line: str) -> None:
    print(line, flush=True)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` is set within `timeout` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def serve(config: ServerConfig, engine_config: EngineConfig, *,
                announce=_say) -> None:
    """Run the server until SIGTERM or SIGINT, then drain and exit. With the default model
    (engine_config.model None) and no adapter_dir, the demo adapters are preloaded."""
    demo = engine_config.model is None and config.adapter_dir is None
    adapter_dir = str(DEMO_ADAPTER_DIR) if demo else config.adapter_dir
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = NoraServer(config)
    try:
        await server.start()
    except ListenError as exc:
        announce(f"nora: {exc}")
        raise SystemExit(1) from None
    where = "localhost" if config.host in ("0.0.0.0", "::", "[::]") else config.host
    announce(f"nora: listening on {config.host}:{server.port} "
             f"({'TLS' if config.tls_cert else 'plaintext'}); loading "
             f"{engine_config.model or 'the default model'} ...")
    try:
        # the demo adapters' directory is in the package (read-only): no state kept there
        engine = await _load_engine(engine_config, adapter_dir, stop, durable=not demo)
    except Exception as exc:
        if not isinstance(exc, MissingModelPackages):  # that one's message says it all
            log.exception("loading the model failed")
        announce(f"nora: loading the model failed: {type(exc).__name__}: {exc}")
        await server.stop(0)
        raise SystemExit(1) from exc
    if engine is None:  # stopped while loading
        await server.stop(0)
        return
    try:
        adapters = preload_adapters(engine, adapter_dir) if adapter_dir else []
        for adapter_id in adapters:  # preloaded adapters claim their metric labels first
            server.metrics.adapter_label(adapter_id)
        await server.attach(engine)
        i = engine.info
        announce(f"nora: serving {i.name} ({i.mode} mode, {i.device}, {i.dtype}) on "
                 f"{config.host}:{server.port}")
        if server.http_port is not None:
            scheme = "https" if config.tls_cert else "http"
            announce(f"nora: OpenAI-compatible API at {scheme}://{where}:{server.http_port}/v1"
                     + (" (with a bearer token)" if server.auth.enabled else ""))
        if server.metrics_port is not None:
            host = config.metrics_host or config.host
            host = "localhost" if host in ("0.0.0.0", "::", "[::]") else host
            scheme = "https" if config.tls_cert else "http"
            announce(f"nora: metrics at {scheme}://{host}:{server.metrics_port}/metrics"
                     + (" (with a bearer token)" if server.auth.enabled else ""))
        announce(f"nora: adapters: {', '.join(adapters) or '(none)'}")
        example = f" --adapter {adapters[0]}" if adapters else ""
        flags = "" if server.port == 50051 and where == "localhost" else (
            f" --target {where}:{server.port}")
        flags += " --tls-ca CERT.pem" if config.tls_cert else ""
        flags += " --token TOKEN" if server.auth.enabled else ""
        if engine.tokenizer.chat_template:
            announce(f'nora: try   nora{flags} generate --chat{example} '
                     '"What is the capital of France?"')
        else:
            announce(f'nora: try   nora{flags} generate{example} "Hello"')
        while not await _wait(stop, 1.0):
            if not engine.alive:  # its loop thread died (logged): exit so it gets restarted
                announce("nora: the engine stopped; exiting")
                await server.stop(0)
                raise SystemExit(1)
        announce(f"nora: draining (up to {config.grace_seconds:g} s) ...")
        await server.stop()
    finally:
        engine.shutdown()
    announce("nora: stopped")
