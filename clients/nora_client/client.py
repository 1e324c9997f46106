"""Python clients of nora's gRPC API: `NoraClient` (blocking) and `AsyncNoraClient` (asyncio).

    with NoraClient("localhost:50051") as nora:
        print(nora.generate("Hello", adapter_id="demo-1", max_new_tokens=32).text)
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        for part in nora.generate_stream(messages=chat, temperature=0):
            print(part.text, end="", flush=True)

The input of a generation is exactly one of: text, token ids (a list of ints, or what
`tokenizer(...)` / `apply_chat_template(..., tokenize=True)` return: a BatchEncoding, a numpy
array or torch tensor of one row) or `messages=` (a conversation the server formats with the
model's chat template). Unset sampling parameters take the served model's defaults (its
generation config; `model_info().default_sampling`).

Responses are the API's proto messages (typed by nora_pb2.pyi). Options: a bearer token (and an
admin token for LoadAdapter/UnloadAdapter), TLS with a CA file, a client certificate (mTLS).
Calls the server could not take (UNAVAILABLE: not reachable, still loading, draining) are
retried by gRPC's own retry policy, with exponential backoff, up to `retries` times (at most 4:
gRPC's limit is 5 attempts).
"""

from __future__ import annotations

import json
import operator
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from nora_proto.v1 import nora_pb2, nora_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

# text; token ids: a sequence of ints, a BatchEncoding (its "input_ids"), a numpy array or
# torch tensor, 1-D or of one row
Prompt = str | Sequence[int] | Mapping[str, Any] | Any
# dicts {"role", "content"} or ChatMessage protos
Messages = Sequence[Mapping[str, str] | nora_pb2.ChatMessage]


def token_ids(ids: Any) -> list[int]:
    """Token ids as a list of ints from a list or tuple of ints, a mapping with "input_ids" (a
    BatchEncoding), or an array-like with `.tolist()` (numpy, torch), 1-D or 2-D with one row.
    Neither numpy nor torch is imported."""
    if isinstance(ids, Mapping):
        if "input_ids" not in ids:
            raise TypeError("a mapping prompt needs an 'input_ids' entry (as a BatchEncoding)")
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):  # numpy array, torch tensor
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"token ids must be a sequence of ints, got {type(ids).__name__}")
    first = ids[0] if ids else None
    if isinstance(first, (Mapping, nora_pb2.ChatMessage)):
        raise TypeError("a conversation goes in messages=, not in prompt")
    if (isinstance(first, Sequence) and not isinstance(first, (str, bytes))
            or getattr(first, "ndim", 0) >= 1):  # rows of a batch (not 0-d tensors, np ints)
        if len(ids) != 1:
            raise ValueError(f"token ids of one sequence expected, got a batch of {len(ids)}")
        return token_ids(ids[0])
    out = []
    for t in ids:
        if isinstance(t, bool):
            raise TypeError("token ids must be ints, got a bool")
        try:
            t = operator.index(t)  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"token ids must be ints, got {type(t).__name__}") from None
        if t < 0:
            raise ValueError(f"token ids must be >= 0, got {t}")
        out.append(t)
    return out


def chat_messages(messages: Messages) -> list[nora_pb2.ChatMessage]:
    """ChatMessage protos from dicts {"role", "content"} (strings; no other keys) or
    ChatMessages."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role', 'content'} dicts or ChatMessages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, nora_pb2.ChatMessage):
            out.append(m)
            continue
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict or ChatMessage, got "
                            f"{type(m).__name__}")
        if set(m) != {"role", "content"}:
            raise ValueError(f"messages[{i}] must have exactly the keys role and content, got "
                             f"{sorted(m)}")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise TypeError(f"messages[{i}]: role and content must be strings")
        out.append(nora_pb2.ChatMessage(role=m["role"], content=m["content"]))
    return out


def generate_request(prompt: Prompt | None = None, *, messages: Messages | None = None,
                     adapter_id: str | None = None,
                     adapter_bytes: bytes | None = None, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None,
                     repetition_penalty: float | None = None, seed: int | None = None,
                     max_new_tokens: int | None = None, stop: Sequence[str] = (),
                     stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                     time_limit: float | None = None, logprobs: bool = False,
                     input_tokens: bool = False,
                     request_id: str = "", n: int | None = None,
                     presence_penalty: float | None = None,
                     frequency_penalty: float | None = None, min_p: float | None = None,
                     min_new_tokens: int = 0, top_logprobs: int = 0,
                     truncate_input_tokens: int = 0, json_object: bool = False,
                     json_schema: Mapping[str, Any] | str | None = None,
                     regex: str | None = None) -> nora_pb2.GenerateRequest:
    """A GenerateRequest; None leaves a parameter to the server's default (the model's).
    Exactly one of `prompt` (text or token ids, see `token_ids`) and `messages` (a
    conversation). At most one of `adapter_id` and `adapter_bytes` (an adapter file's
    contents). `n`: sequences to generate (responses carry their `index`; unary: `choices`).
    `top_logprobs` > 0 implies `logprobs`. Structured output: at most one of `json_object`
    (any JSON object), `json_schema` (a schema as a dict or JSON text) and `regex`.
    `truncate_input_tokens` > 0 keeps only the input's last that many tokens."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text or token ids) and messages")
    if adapter_id is not None and adapter_bytes is not None:
        raise ValueError("give adapter_id or adapter_bytes, not both")
    req = nora_pb2.GenerateRequest(request_id=request_id)
    if messages is not None:
        req.messages.extend(chat_messages(messages))
    elif isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.token_ids.ids.extend(token_ids(prompt))
    if adapter_id is not None:
        req.adapter_id = adapter_id
    elif adapter_bytes is not None:
        req.adapter_bytes = adapter_bytes
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                "repetition_penalty": repetition_penalty, "seed": seed,
                "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                "min_p": min_p, "n": n}
    for name, value in sampling.items():
        if value is not None:
            setattr(req.sampling, name, value)
    if max_new_tokens is not None:
        req.stopping.max_new_tokens = max_new_tokens
    req.stopping.stop.extend(stop)
    req.stopping.stop_token_ids.extend(stop_token_ids)
    req.stopping.ignore_eos = ignore_eos
    req.stopping.time_limit_seconds = time_limit or 0.0
    req.stopping.min_new_tokens = min_new_tokens
    req.options.logprobs, req.options.input_tokens = logprobs or top_logprobs > 0, input_tokens
    req.options.top_logprobs = top_logprobs
    req.truncate_input_tokens = truncate_input_tokens
    formats = [f for f, v in (("json_object", json_object), ("json_schema", json_schema),
                              ("regex", regex)) if v not in (None, False)]
    if len(formats) > 1:
        raise ValueError(f"give at most one of json_object, json_schema and regex, got "
                         f"{' and '.join(formats)}")
    if json_object:
        req.response_format.json_object = True
    elif json_schema is not None:
        req.response_format.json_schema = (json_schema if isinstance(json_schema, str)
                                           else json.dumps(json_schema))
    elif regex is not None:
        req.response_format.regex = regex
    return req


def tokenize_request(text: str | None, messages: Messages | None,
                     add_special_tokens: bool) -> nora_pb2.TokenizeRequest:
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text and messages")
    if messages is not None:
        return nora_pb2.TokenizeRequest(messages=chat_messages(messages))
    return nora_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)


def load_request(adapter_id: str, path: str | None,
                 data: bytes | None) -> nora_pb2.LoadAdapterRequest:
    if (path is None) == (data is None):
        raise ValueError("give exactly one of path (inside the server's store) and data")
    if path is not None:
        return nora_pb2.LoadAdapterRequest(adapter_id=adapter_id, path=path)
    return nora_pb2.LoadAdapterRequest(adapter_id=adapter_id, data=data)


def _read(pem: str | bytes | Path | None) -> bytes | None:
    """PEM bytes given as bytes or as a file path."""
    if pem is None or isinstance(pem, bytes):
        return pem
    return Path(pem).read_bytes()


def _service_config(retries: int) -> str:
    """gRPC retry policy: UNAVAILABLE only (model loading, draining, connection down). gRPC
    retries a call only before any response arrived; a generation cut off by a dropped
    connection may have started on the server, which then cancels it as the client left."""
    retry = {"maxAttempts": min(retries, 4) + 1,  # gRPC allows at most 5 attempts
             "initialBackoff": "0.2s", "maxBackoff": "5s", "backoffMultiplier": 2,
             "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": retry}]})


class _Options:
    """Connection settings shared by the blocking and the asyncio client."""

    def __init__(self, target: str, *, token: str | None, admin_token: str | None,
                 tls: bool, ca_cert: str | bytes | Path | None,
                 client_cert: str | bytes | Path | None, client_key: str | bytes | Path | None,
                 server_name: str | None, timeout: float | None, retries: int,
                 max_message_bytes: int) -> None:
        self.target, self.timeout = target, timeout
        self.token, self.admin_token = token, admin_token
        self.tls = tls or any(x is not None for x in (ca_cert, client_cert, client_key))
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_cert), private_key=_read(client_key),
            certificate_chain=_read(client_cert)) if self.tls else None
        self.options = [("grpc.max_receive_message_length", max_message_bytes),
                        ("grpc.max_send_message_length", max_message_bytes)]
        if retries > 0:
            self.options += [("grpc.enable_retries", 1),
                             ("grpc.service_config", _service_config(retries))]
        else:
            self.options.append(("grpc.enable_retries", 0))
        if server_name:
            self.options.append(("grpc.ssl_target_name_override", server_name))

    def metadata(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        token = (self.admin_token or self.token) if admin else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def call(self, timeout: float | None, admin: bool = False) -> dict:
        return {"metadata": self.metadata(admin),
                "timeout": self.timeout if timeout is None else timeout}


class NoraClient:
    """Blocking client. `target`: "host:port". `tls`: use TLS with the system's roots, or with
    `ca_cert` (PEM bytes or a file path); `client_cert` and `client_key` for mTLS;
    `server_name` overrides the name checked against the server's certificate. `timeout`: the
    default deadline of each call in seconds (None: none)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 admin_token: str | None = None, tls: bool = False,
                 ca_cert: str | bytes | Path | None = None,
                 client_cert: str | bytes | Path | None = None,
                 client_key: str | bytes | Path | None = None, server_name: str | None = None,
                 timeout: float | None = None, retries: int = 4,
                 max_message_bytes: int = 16 << 20) -> None:
        self._o = o = _Options(target, token=token, admin_token=admin_token, tls=tls,
                               ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
                               server_name=server_name, timeout=timeout, retries=retries,
                               max_message_bytes=max_message_bytes)
        self.channel = (grpc.secure_channel(target, o.credentials, o.options) if o.tls
                        else grpc.insecure_channel(target, o.options))
        self.stub = nora_pb2_grpc.NoraStub(self.channel)

    def __enter__(self) -> NoraClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, prompt: Prompt | None = None, *, messages: Messages | None = None,
                 timeout: float | None = None, **params) -> nora_pb2.GenerateResponse:
        """The whole completion of `prompt` (text or token ids) or the assistant's answer to
        `messages`. `params`: as `generate_request`."""
        req = generate_request(prompt, messages=messages, **params)
        return self.stub.Generate(req, **self._o.call(timeout))

    def generate_stream(self, prompt: Prompt | None = None, *,
                        messages: Messages | None = None, timeout: float | None = None,
                        **params) -> Iterator[nora_pb2.GenerateResponse]:
        """The completion as it is generated; the last message has finish_reason and usage.
        The iterator is also the gRPC call: `.cancel()` aborts the request on the server."""
        req = generate_request(prompt, messages=messages, **params)
        return self.stub.GenerateStream(req, **self._o.call(timeout))

    def tokenize(self, text: str | None = None, *, messages: Messages | None = None,
                 add_special_tokens: bool = False, timeout: float | None = None) -> list[int]:
        """Token ids of `text`, or of `messages` under the chat template (with the assistant's
        generation prompt: what generate(messages=...) generates from)."""
        req = tokenize_request(text, messages, add_special_tokens)
        return list(self.stub.Tokenize(req, **self._o.call(timeout)).token_ids)

    def model_info(self, *, timeout: float | None = None) -> nora_pb2.ModelInfoResponse:
        return self.stub.ModelInfo(nora_pb2.ModelInfoRequest(), **self._o.call(timeout))

    def load_adapter(self, adapter_id: str, *, path: str | None = None,
                     data: bytes | None = None,
                     timeout: float | None = None) -> nora_pb2.AdapterInfo:
        """Load (or replace) an adapter: a file inside the server's adapter store (`path`,
        relative to it) or the file's bytes (`data`)."""
        req = load_request(adapter_id, path, data)
        return self.stub.LoadAdapter(req, **self._o.call(timeout, admin=True)).adapter

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self.stub.UnloadAdapter(nora_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
                                **self._o.call(timeout, admin=True))

    def list_adapters(self, *, timeout: float | None = None) -> nora_pb2.ListAdaptersResponse:
        return self.stub.ListAdapters(nora_pb2.ListAdaptersRequest(), **self._o.call(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" = the server): "SERVING", "NOT_SERVING", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                           **self._o.call(timeout))
        return HEALTH_STATUS.get(reply.status, str(reply.status))


class AsyncNoraClient:
    """asyncio client; the same options and methods as NoraClient, as coroutines (and
    `generate_stream` as an async iterator). Create it inside the event loop that uses it."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 admin_token: str | None = None, tls: bool = False,
                 ca_cert: str | bytes | Path | None = None,
                 client_cert: str | bytes | Path | None = None,
                 client_key: str | bytes | Path | None = None, server_name: str | None = None,
                 timeout: float | None = None, retries: int = 4,
                 max_message_bytes: int = 16 << 20) -> None:
        self._o = o = _Options(target, token=token, admin_token=admin_token, tls=tls,
                               ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
                               server_name=server_name, timeout=timeout, retries=retries,
                               max_message_bytes=max_message_bytes)
        self.channel = (grpc.aio.secure_channel(target, o.credentials, o.options) if o.tls
                        else grpc.aio.insecure_channel(target, o.options))
        self.stub = nora_pb2_grpc.NoraStub(self.channel)

    async def __aenter__(self) -> AsyncNoraClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: Prompt | None = None, *,
                       messages: Messages | None = None, timeout: float | None = None,
                       **params) -> nora_pb2.GenerateResponse:
        req = generate_request(prompt, messages=messages, **params)
        return await self.stub.Generate(req, **self._o.call(timeout))

    async def generate_stream(self, prompt: Prompt | None = None, *,
                              messages: Messages | None = None, timeout: float | None = None,
                              **params) -> AsyncIterator[nora_pb2.GenerateResponse]:
        """Closing the iterator early (or cancelling its task) aborts the request."""
        req = generate_request(prompt, messages=messages, **params)  # raises before the call
        call = self.stub.GenerateStream(req, **self._o.call(timeout))
        try:
            async for part in call:
                yield part
        finally:
            call.cancel()  # no-op once the call has finished

    async def tokenize(self, text: str | None = None, *, messages: Messages | None = None,
                       add_special_tokens: bool = False,
                       timeout: float | None = None) -> list[int]:
        req = tokenize_request(text, messages, add_special_tokens)
        return list((await self.stub.Tokenize(req, **self._o.call(timeout))).token_ids)

    async def model_info(self, *, timeout: float | None = None) -> nora_pb2.ModelInfoResponse:
        return await self.stub.ModelInfo(nora_pb2.ModelInfoRequest(), **self._o.call(timeout))

    async def load_adapter(self, adapter_id: str, *, path: str | None = None,
                           data: bytes | None = None,
                           timeout: float | None = None) -> nora_pb2.AdapterInfo:
        req = load_request(adapter_id, path, data)
        return (await self.stub.LoadAdapter(req, **self._o.call(timeout, admin=True))).adapter

    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self.stub.UnloadAdapter(nora_pb2.UnloadAdapterRequest(adapter_id=adapter_id),
                                      **self._o.call(timeout, admin=True))

    async def list_adapters(self, *,
                            timeout: float | None = None) -> nora_pb2.ListAdaptersResponse:
        return await self.stub.ListAdapters(nora_pb2.ListAdaptersRequest(),
                                            **self._o.call(timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                 **self._o.call(timeout))
        return HEALTH_STATUS.get(reply.status, str(reply.status))
