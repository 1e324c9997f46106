"""The OpenAI-compatible HTTP API: the same engine as gRPC, in the same process and event loop.

    GET  /v1/models                 the base model and every named adapter (`parent`: the base)
    GET  /v1/models/{model}
    POST /v1/chat/completions       `messages` through the chat template
    POST /v1/completions            `prompt`: text, token ids, or a list of either
    GET  /health                    200 while serving (model loaded, engine alive, not draining)
    GET  /ready                     200 while serving with room for one more request

`model` is the base model's name (`ModelInfo.model`) or a named adapter's id; inline adapters
are never models. Requests take the servicer's generation path (NoraService: validation and
limits, the tokenizer pool, the chat template and its end-of-turn token, tenants and quotas,
adapter holds, metrics, structured output's grammar check, the fan-out of n), so both edges
refuse and count alike. A request with `n` > 1 (or several prompts) is that many engine
requests, admitted together; choice i > 0 gets a seed derived from `seed` (choice 0 gets `seed`
itself, as with n = 1), as on gRPC (`choice_seed`).

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status of the gRPC status the shared path raises (HTTP_STATUS): 400 invalid, 401 missing or
unknown bearer token, 404 unknown model, 413 body over --max-message-bytes, 429 busy or over
the tenant's quota, 503 loading or draining. Parameters the engine lacks are accepted at their
neutral values (logit_bias {}, tools [], ...) and otherwise refused with a 400 naming them.
Supported: `presence_penalty`, `frequency_penalty`, `logprobs` / `top_logprobs` (chat, up to 20;
completions' `logprobs` up to 5), `response_format` (`text`, `json_object`, `json_schema` with
its `schema`; on completions too; a schema that does not compile is a 400). Beyond OpenAI's
fields (vLLM's names): `top_k`, `repetition_penalty`, `ignore_eos`, `min_p`, `min_tokens`,
`truncate_prompt_tokens`.

Served by uvicorn inside the server's event loop: `HttpApi.start` binds the socket itself (a port
in use is a ListenError) and runs `uvicorn.Server.serve()` as a task; `stop` drains like gRPC
(new requests 503, in-flight ones get the grace period, then are cancelled, which aborts their
engine requests). A client that disconnects cancels its request the same way. /health and
/ready need no token (load balancers probe them); everything under /v1 does when auth is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.registry import INLINE_PREFIX, AdapterNotFound
from nora_runtime.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from nora_runtime.structured import StructuredOutput
from nora_server.auth import Auth, Caller
from nora_server.messages import MAX_N
from nora_server.rpc import clip, status_of
from nora_server.service import NoraService, _check_adapter_id, choice_seed

log = logging.getLogger(__name__)

Code = grpc.StatusCode
HTTP_STATUS = {  # gRPC status of the shared path -> HTTP status, OpenAI error type
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.FAILED_PRECONDITION: (400, "invalid_request_error"),
    Code.NOT_FOUND: (404, "invalid_request_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.PERMISSION_DENIED: (403, "permission_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.UNAVAILABLE: (503, "service_unavailable"),
}
MAX_CHOICES = 64  # choices per request (prompts x n)
MAX_PROMPTS = 64
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "time_limit": "length",
          "abort": "abort", "error": "error"}
# parameters of the engine's later features: accepted at their neutral values, else refused
NEUTRAL = {
    "logit_bias": ({},), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "function_call": ("none",), "audio": (),
    "prediction": (), "web_search_options": (), "modalities": (["text"],), "suffix": ("",),
    "echo": (False,),
}
CHAT_ONLY = {"tools", "functions", "tool_choice", "function_call", "audio",
             "prediction", "web_search_options", "modalities"}
COMPLETIONS_ONLY = {"suffix", "echo"}


class ApiError(Exception):
    """A request refused with an HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": clip(self.message), "type": self.type,
                          "param": self.param, "code": self.code}}


def api_error(exc: BaseException, model: str | None = None) -> ApiError:
    """The ApiError a failure of the shared path answers with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdapterNotFound):
        return ApiError(404, f"the model {model!r} does not exist (GET /v1/models lists the "
                             "base model and its adapters)", param="model",
                        code="model_not_found")
    code, message = status_of(exc)
    if code == Code.INTERNAL:
        log.error("HTTP request failed", exc_info=exc)
        return ApiError(500, message, type="server_error")
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    return ApiError(status, message, type=kind, code=code.name.lower())


# ---- request fields --------------------------------------------------------------------------


def _number(body: dict, name: str, *, low: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {_brief(value)}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be >= {low:g}, got {value}", param=name)
    return value


def _int(body: dict, name: str, *, low: int = 0, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {_brief(value)}", param=name)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be {bound}, got {value}", param=name)
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_brief(value)}", param=name)
    return value


def _brief(value: object, limit: int = 64) -> str:
    text = json.dumps(value)[:limit + 1] if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _neutral(value: object, options: tuple) -> bool:
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in options)


def _refuse_features(body: dict, chat: bool) -> None:
    """400 naming the first parameter the engine cannot honour yet (neutral values pass)."""
    for name, neutral in NEUTRAL.items():
        if name in (COMPLETIONS_ONLY if chat else CHAT_ONLY):
            continue
        value = body.get(name)
        if value is None or _neutral(value, neutral):
            continue
        raise ApiError(400, f"{name} {_brief(value)} is not supported by this server yet"
                            + (f" (only {json.dumps(neutral[0])})" if neutral else ""),
                       param=name, code="unsupported_parameter")
    best_of = body.get("best_of")
    if not chat and best_of is not None and best_of != body.get("n", 1):
        raise ApiError(400, "best_of other than n is not supported", param="best_of",
                       code="unsupported_parameter")


def _sampling(body: dict, defaults: SamplingParams, *, chat: bool) -> tuple[SamplingParams,
                                                                             int | None]:
    """SamplingParams of a request (unset fields: the model's defaults) and its max tokens
    (None: the rest of the context)."""
    kw: dict = {}
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_p"):
        if (value := _number(body, name)) is not None:
            kw[name] = value
    if (top_k := _int(body, "top_k")) is not None:
        kw["top_k"] = top_k
    if (min_tokens := _int(body, "min_tokens")) is not None:
        kw["min_new_tokens"] = min_tokens
    if (truncate := _int(body, "truncate_prompt_tokens", low=1)) is not None:
        kw["truncate_prompt_tokens"] = truncate
    kw["structured"] = _response_format(body.get("response_format"))
    if (seed := _int(body, "seed", high=MAX_SEED)) is not None:
        kw["seed"] = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str)
                                                                for s in stop)):
        raise ApiError(400, f"stop must be a string or a list of strings, got {_brief(stop)}",
                       param="stop")
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", high=MAX_TOP_LOGPROBS) or 0
        if top and not logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        count = _int(body, "logprobs", high=5)
        logprobs, top = count is not None, count or 0
    max_tokens = _int(body, "max_completion_tokens", low=1) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", low=1)
    # max_tokens unset: the rest of the context, set by the caller; till then room for min_tokens
    kw["max_new_tokens"] = max_tokens if max_tokens is not None else max(
        defaults.max_new_tokens, kw.get("min_new_tokens", 0))
    try:
        params = dataclasses.replace(defaults, **kw, stop=tuple(stop or ()), stop_token_ids=(),
                                     ignore_eos=_bool(body, "ignore_eos"), logprobs=logprobs,
                                     top_logprobs=top)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return params, max_tokens


def _response_format(fmt: object) -> StructuredOutput | None:
    """The StructuredOutput of OpenAI's response_format: {"type": "text"} (or none): None;
    {"type": "json_object"}; {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"?}} (a missing schema: any JSON object)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, 'response_format json_schema needs "json_schema": {"name": ..., '
                                '"schema": {...}}', param="response_format")
        schema = spec.get("schema")
        if schema is None:
            return StructuredOutput("json_object")
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, f"response_format.json_schema.schema must be a JSON schema "
                                f"object, got {_brief(schema)}", param="response_format")
        try:
            return StructuredOutput.json_schema(schema)
        except ValueError as exc:
            raise ApiError(400, f"response_format: {exc}", param="response_format") from None
    raise ApiError(400, 'response_format must be {"type": "text"}, {"type": "json_object"} or '
                        f'{{"type": "json_schema", ...}}, got {_brief(fmt)}',
                   param="response_format")


def _conversation(body: dict) -> list[dict[str, str]]:
    """OpenAI messages as the chat template takes them: text content (parts joined), role
    "developer" as "system"."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"messages[{i}]: tool calls are not supported",
                           param="messages", code="unsupported_parameter")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts "
                                    '({"type": "text", "text": ...}) are supported',
                               param="messages")
            content = "".join(p["text"] for p in content)
        role = m.get("role")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompts(body: dict) -> list[tuple[str, object]]:
    """The inputs of a completions request: ("prompt", text) or ("token_ids", ids) each."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [("prompt", prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [("token_ids", prompt)]
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts, got {len(prompt)}",
                           param="prompt")
        out: list[tuple[str, object]] = []
        for p in prompt:
            if isinstance(p, str):
                out.append(("prompt", p))
            elif (isinstance(p, list) and p
                  and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
                out.append(("token_ids", p))
            else:
                break
        else:
            return out
    raise ApiError(400, "prompt must be a string, a list of token ids, or a list of those",
                   param="prompt")


# ---- the app ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One engine request of an HTTP request: choice `index` of prompt ids `ids`."""

    index: int
    ids: list[int]
    params: SamplingParams
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    tops: list[tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0
    offset: int = 0  # characters of text sent (completions' text_offset)


class HttpApi:
    """The Starlette app of one NoraServer and the uvicorn server that runs it."""

    def __init__(self, service: NoraService, auth: Auth) -> None:
        self.service, self.auth = service, auth
        self.started = int(time.time())
        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", _Asgi(functools.partial(self._asgi, chat=True)),
                  methods=["POST"]),
            Route("/v1/completions", _Asgi(functools.partial(self._asgi, chat=False)),
                  methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
        ]
        self.paths = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health",
                      "/ready"}
        self.app = _counted(Starlette(routes=routes,
                                      exception_handlers={HTTPException: _http_error}),
                            self._count)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str, port: int, *, tls: tuple[str, str] | None = None,
                    client_ca: str | None = None, grace: float = 30.0) -> int:
        """Listen on host:port (OSError if it cannot) and serve; the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
            sock.bind((host.strip("[]"), port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        uvicorn_log = logging.getLogger("uvicorn.error")  # its start/stop lines are INFO
        if uvicorn_log.level == logging.NOTSET:  # under that alarming name: keep them quiet
            uvicorn_log.setLevel(logging.WARNING)
        kw = {}
        if tls is not None:
            kw = dict(ssl_certfile=tls[0], ssl_keyfile=tls[1])
            if client_ca:
                kw.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        # proxy_headers off: request.client is the real peer (loopback admin rule)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                proxy_headers=False, timeout_graceful_shutdown=grace, **kw)
        self._server = server = _Server(config)
        self._task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:  # startup binds nothing (the socket is ours): quick
            if self._task.done():
                self._task.result()
                raise OSError("the HTTP server did not start")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stop listening; in-flight requests get `grace` seconds, then are cancelled."""
        if self._server is None or self._task is None:
            return
        # (uvicorn's wait with a timeout of 0 times out, and logs an error, even when idle)
        self._server.config.timeout_graceful_shutdown = max(grace, 0.05)
        self._server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._task

    def _count(self, path: str, status: int | None) -> None:
        path = "/v1/models" if path.startswith("/v1/models/") else path
        self.service.metrics.http_requests.labels(
            path if path in self.paths else "other",
            "none" if status is None else str(status)).inc()

    # ---- health ------------------------------------------------------------------------------

    def _state(self) -> str:
        return self.service.state()

    async def health(self, request: Request) -> JSONResponse:
        state = self._state()
        return JSONResponse({"status": state}, status_code=200 if state == "serving" else 503)

    async def ready(self, request: Request) -> JSONResponse:
        state = self._state()
        if state == "serving" and self.service.in_flight >= \
                self.service.config.max_concurrent_requests:
            state = "busy"
        return JSONResponse({"status": "ready" if state == "serving" else state},
                            status_code=200 if state == "serving" else 503)

    # ---- models ------------------------------------------------------------------------------

    def _caller(self, request: Request) -> Caller:
        header = request.headers.get("authorization")
        client = request.client
        peer = None
        if client is not None:
            peer = (f"ipv6:[{client.host}]:{client.port}" if ":" in client.host
                    else f"ipv4:{client.host}:{client.port}")
        caller = self.auth.caller([("authorization", header)] if header else [], peer)
        if caller is None:
            why = ("missing bearer token (Authorization: Bearer <token> header)"
                   if not header else "invalid bearer token")
            raise ApiError(401, why, type="authentication_error", code="invalid_api_key")
        return caller

    def _model_cards(self, engine: Engine) -> list[dict]:
        base = engine.info.name
        cards = [{"id": base, "object": "model", "created": self.started, "owned_by": "nora",
                  "root": base, "parent": None}]
        for a in engine.list_adapters():
            if not a.id.startswith(INLINE_PREFIX):  # inline adapters are never models
                cards.append({"id": a.id, "object": "model", "created": int(a.loaded_at),
                              "owned_by": "nora", "root": base, "parent": base})
        return cards

    async def models(self, request: Request) -> JSONResponse:
        try:
            self._caller(request)
            cards = self._model_cards(self.service._engine())
        except Exception as exc:
            return _error_response(api_error(exc))
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, request: Request) -> JSONResponse:
        model = request.path_params["model"]
        try:
            self._caller(request)
            engine = self.service._engine()
            for card in self._model_cards(engine):
                if card["id"] == model:
                    return JSONResponse(card)
            raise AdapterNotFound(model)
        except Exception as exc:
            return _error_response(api_error(exc, model))

    # ---- completions -------------------------------------------------------------------------

    async def _asgi(self, scope, receive, send, *, chat: bool) -> None:
        """One completions request. Once its body is read, the work runs as its own task,
        cancelled if the client disconnects (which aborts its engine requests, as a gRPC
        cancel does)."""
        request, out = Request(scope, receive), _Responder(send)
        try:
            caller = self._caller(request)
            body = await _json_body(request, self.service.config.max_message_bytes)
        except ClientDisconnect:  # gone before its request arrived: nobody to answer
            return
        except Exception as exc:
            await out.error(api_error(exc))
            return
        work = asyncio.ensure_future(self._complete(body, caller, out, chat=chat))
        watch = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, work):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)

    async def _complete(self, body: dict, caller: Caller, out: _Responder, *,
                        chat: bool) -> None:
        model = body.get("model")
        try:
            if not isinstance(model, str) or not model:
                raise ApiError(400, "model must be the base model's name or an adapter id "
                                    "(GET /v1/models)", param="model")
            await self._generate(body, caller, model, out, chat=chat)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await out.error(api_error(exc, model))

    async def _generate(self, body: dict, caller: Caller, model: str, out: _Responder, *,
                        chat: bool) -> None:
        s = self.service
        engine = s.serving_engine()
        adapter = None if model == engine.info.name else model
        if adapter is not None:
            try:
                _check_adapter_id(adapter)
            except ValueError:
                raise AdapterNotFound(model) from None
        _refuse_features(body, chat)
        params, max_tokens = _sampling(body, engine.default_params, chat=chat)
        await s.check_structured(engine, params)
        n = _int(body, "n", low=1, high=MAX_N) or 1
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true",
                           param="stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        include_usage = stream and _bool(options or {}, "include_usage")
        inputs = [("messages", _conversation(body))] if chat else _prompts(body)
        if len(inputs) * n > MAX_CHOICES:
            raise ApiError(400, f"{len(inputs)} prompts x n = {len(inputs) * n} choices; the "
                                f"limit is {MAX_CHOICES}", param="n")
        jobs: list[_Job] = []
        holds: list = []
        with s.admitted(caller.tenant, len(inputs) * n):
            try:
                prompt_tokens = 0
                for p, (kind, value) in enumerate(inputs):
                    ids = s.truncated(await s.input_ids(engine, kind, value), params)
                    prompt_tokens += len(ids)
                    new = max_tokens or max(1, s.max_total_tokens(engine) - len(ids))
                    s._check_lengths(engine, len(ids), new)
                    base, end_of_turn = await s.chat_stops(
                        engine, kind, dataclasses.replace(params, max_new_tokens=new))
                    for i in range(n):
                        jobs.append(_Job(p * n + i, ids, dataclasses.replace(
                            base, seed=choice_seed(params.seed, i))))
                for _ in jobs:
                    holds.append(await s.hold(engine, adapter))
                streams = [s.events(engine, job.ids, job.params, hold, tenant=caller.tenant,
                                    end_of_turn=end_of_turn, arrival=out.arrival)
                           for job, hold in zip(jobs, holds, strict=True)]
                await self._run(engine, jobs, streams, out, chat=chat, model=model,
                                stream=stream, include_usage=include_usage,
                                prompt_tokens=prompt_tokens)
            finally:
                for hold in holds:
                    if hold is not None:
                        hold.release()  # never submitted (an error or cancel came first)

    async def _run(self, engine: Engine, jobs: list[_Job],
                   streams: list[AsyncIterator[TokenEvent]], out: _Responder, *, chat: bool,
                   model: str, stream: bool, include_usage: bool, prompt_tokens: int) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                   "model": model, "choices": choices}
            if include_usage:
                out["usage"] = usage
            return out

        def usage() -> dict:
            completion = sum(j.completion_tokens for j in jobs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        if stream:
            await out.start_stream()
            if chat:
                for job in jobs:
                    await out.event(chunk([{"index": job.index, "logprobs": None,
                                            "finish_reason": None,
                                            "delta": {"role": "assistant", "content": ""}}]))
        async with NoraService.merged(streams) as events:
            async for j, ev in events:
                job = jobs[j]
                tokens, logprobs, tops = _shown_tokens(ev, job.params)
                job.text += ev.text
                job.tokens += tokens
                job.logprobs += logprobs
                job.tops += tops
                if ev.finish_reason is not None:
                    job.finish = FINISH[ev.finish_reason]
                    job.completion_tokens = ev.num_output_tokens
                    if ev.finish_reason == "error":
                        raise ApiError(500, f"the engine failed: {ev.error}", type="server_error")
                if not stream:
                    continue
                lp = self._logprobs(engine, tokens, logprobs, tops, job, chat) if (
                    job.params.logprobs) else None
                if ev.text or lp is not None and tokens:
                    choice = {"index": job.index, "logprobs": lp, "finish_reason": None}
                    choice.update({"delta": {"content": ev.text}} if chat else
                                  {"text": ev.text})
                    await out.event(chunk([choice]))
                if job.finish is not None:
                    choice = {"index": job.index, "logprobs": None, "finish_reason": job.finish}
                    choice.update({"delta": {}} if chat else {"text": ""})
                    await out.event(chunk([choice]))
        if stream:
            if include_usage:
                await out.event(chunk([], usage()))
            await out.done()
            return
        choices = []
        for job in jobs:
            lp = self._logprobs(engine, job.tokens, job.logprobs, job.tops, job, chat) if (
                job.params.logprobs) else None
            choice = {"index": job.index, "logprobs": lp, "finish_reason": job.finish}
            choice.update({"message": {"role": "assistant", "content": job.text}} if chat
                          else {"text": job.text})
            choices.append(choice)
        await out.json(200, {"id": rid, "object": kind, "created": created, "model": model,
                             "choices": choices, "usage": usage()})

    @staticmethod
    def _logprobs(engine: Engine, tokens: list[int], logprobs: list[float],
                  tops: list[tuple[tuple[int, float], ...]], job: _Job, chat: bool) -> dict:
        def text(t: int) -> str:
            return engine.tokenizer.decode([t])

        texts = [text(t) for t in tokens]
        k = job.params.top_logprobs
        top_texts = [[(text(t), lp) for t, lp in top] for top in tops] if k else []
        if chat:
            content = [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                        "top_logprobs": [{"token": tt, "logprob": tlp, "bytes": list(tt.encode())}
                                         for tt, tlp in top_texts[i]] if k else []}
                       for i, (t, lp) in enumerate(zip(texts, logprobs, strict=True))]
            return {"content": content, "refusal": None}
        offsets = []
        for t in texts:
            offsets.append(job.offset)
            job.offset += len(t)
        # legacy completions: one {token text: logprob} per position (texts may collide)
        top = [dict(top) for top in top_texts] if k else None
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top,
                "text_offset": offsets}


def _shown_tokens(ev: TokenEvent, params: SamplingParams) -> tuple[list[int], list[float],
                                                                    list]:
    """An event's tokens, logprobs and top logprobs without the stopping token (EOS, end of
    turn, a stop token id), which OpenAI does not report."""
    tokens = list(ev.token_ids)
    logprobs = list(ev.logprobs or ())
    tops = list(ev.top_logprobs or ())
    if tokens and (ev.finish_reason == "eos" or ev.finish_reason == "stop"
                   and tokens[-1] in params.stop_token_ids):
        n = len(tokens) - 1
        tokens, logprobs, tops = tokens[:n], logprobs[:n], tops[:n]
    return tokens, logprobs, tops


class _Responder:
    """Writes one HTTP response: JSON, or server-sent events once `start_stream`ed. Made as the
    request arrives: `arrival` (time.monotonic()) is where its latency metrics start."""

    def __init__(self, send: Callable) -> None:
        self.send, self.started = send, False
        self.arrival = time.monotonic()

    async def json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode()
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await self.send({"type": "http.response.body", "body": body})

    async def start_stream(self) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

    async def event(self, obj: dict) -> None:
        data = b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def done(self) -> None:
        await self.send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def error(self, err: ApiError) -> None:
        if not self.started:
            await self.json(err.status, err.body())
            return
        with contextlib.suppress(Exception):  # mid-stream: an error event, then the end
            await self.event(err.body())
            await self.done()


async def _disconnect(receive) -> None:
    """Returns when the client has gone (call it once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 over `limit` bytes (checked before reading it all)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body has {length} bytes; the limit is {limit} "
                            "(--max-message-bytes)", code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes "
                                "(--max-message-bytes)", code="request_too_large")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown path, wrong method) in OpenAI's error shape."""
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                                     f"{exc.detail}"))


def _counted(app, count: Callable[[str, int | None], None]):
    """`app` calling `count(path, status)` for every HTTP request it finishes."""

    async def counted(scope, receive, send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        status = None

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            count(scope["path"], status)
    return counted


class _Asgi:
    """An ASGI app of a coroutine function (Starlette takes functions and partials of them as
    request -> response endpoints; the completions endpoints write their own responses)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    async def __call__(self, scope, receive, send) -> None:
        await self.fn(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: nora-serve handles SIGTERM/SIGINT (and drains)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield
