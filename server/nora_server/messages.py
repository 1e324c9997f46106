"""Proto messages to engine types and back (DESIGN.md s4: protos stay at the server's edge):
a GenerateRequest's input, sampling parameters and response format; a TokenEvent as a
GenerateResponse; an AdapterInfo as its proto."""

from __future__ import annotations

import dataclasses

from nora_proto.v1 import nora_pb2
from nora_runtime.engine import TokenEvent
from nora_runtime.registry import AdapterInfo
from nora_runtime.sampling import SamplingParams
from nora_runtime.structured import StructuredOutput

FINISH = {  # engine finish reason -> proto enum, metrics label
    "length": (nora_pb2.FINISH_REASON_LENGTH, "length"),
    "eos": (nora_pb2.FINISH_REASON_EOS, "eos"),
    "stop": (nora_pb2.FINISH_REASON_STOP, "stop"),
    "abort": (nora_pb2.FINISH_REASON_CANCELLED, "cancelled"),
    "time_limit": (nora_pb2.FINISH_REASON_TIME_LIMIT, "time_limit"),
    "error": (nora_pb2.FINISH_REASON_ERROR, "error"),
}

MAX_N = 16  # sequences per request (gRPC's sampling.n, HTTP's n per prompt)


def chat_messages(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def input_value(request, kind: str):
    """The input of a GenerateRequest as `NoraService.input_ids` takes it."""
    if kind == "token_ids":
        return request.token_ids.ids
    return chat_messages(request.messages) if kind == "messages" else request.prompt


def input_kind(request) -> str:
    """Which input a GenerateRequest has: "prompt", "token_ids" or "messages"; ValueError unless
    exactly one (`messages` cannot sit in the proto's oneof, so the oneof alone cannot say)."""
    given = [k for k in (request.WhichOneof("input"),) if k] + (
        ["messages"] if request.messages else [])
    if len(given) != 1:
        raise ValueError("the request needs exactly one of prompt, token_ids and messages; got "
                         + (" and ".join(given) if given else "none"))
    return given[0]


MODEL_DEFAULT_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
SAMPLING_FIELDS = (*MODEL_DEFAULT_FIELDS, "presence_penalty", "frequency_penalty", "min_p")


def sampling_params(request, defaults: SamplingParams) -> SamplingParams:
    """SamplingParams of a GenerateRequest; unset fields take `defaults` (the model's). Invalid
    values raise ValueError (INVALID_ARGUMENT)."""
    s, stop, options = request.sampling, request.stopping, request.options
    kw = {f: getattr(s, f) for f in SAMPLING_FIELDS if s.HasField(f)}
    if stop.HasField("max_new_tokens"):
        kw["max_new_tokens"] = stop.max_new_tokens
    return dataclasses.replace(
        defaults, **kw, stop=tuple(stop.stop), stop_token_ids=tuple(stop.stop_token_ids),
        ignore_eos=stop.ignore_eos, logprobs=options.logprobs,
        top_logprobs=options.top_logprobs, min_new_tokens=stop.min_new_tokens,
        truncate_prompt_tokens=request.truncate_input_tokens or None,
        structured=structured_output(request.response_format))


def structured_output(fmt) -> StructuredOutput | None:
    """The StructuredOutput of a ResponseFormat (None: free text)."""
    which = fmt.WhichOneof("format")
    if which is None:
        return None
    if which == "json_object":
        if not fmt.json_object:
            raise ValueError("response_format.json_object must be true (leave response_format "
                             "unset for free text)")
        return StructuredOutput("json_object")
    return StructuredOutput(which, getattr(fmt, which))


def num_sequences(request) -> int:
    """Sequences a GenerateRequest asks for (sampling.n; unset or 0: 1)."""
    n = request.sampling.n or 1
    if n > MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}], got {n}")
    return n


def joined(parts: list[nora_pb2.GenerateResponse]) -> nora_pb2.GenerateResponse:
    """One sequence's stream messages as one message: text joined, tokens, logprobs and top
    logprobs appended, the last part's finish reason and usage."""
    out = nora_pb2.GenerateResponse()
    for part in parts:
        out.MergeFrom(part)  # appends repeated fields; set scalars of later parts win
    out.text = "".join(part.text for part in parts)
    return out


def sampling_proto(params: SamplingParams) -> nora_pb2.SamplingParameters:
    kw = {f: getattr(params, f) for f in MODEL_DEFAULT_FIELDS if getattr(params, f) is not None}
    return nora_pb2.SamplingParameters(**kw)


def adapter_info(a: AdapterInfo) -> nora_pb2.AdapterInfo:
    return nora_pb2.AdapterInfo(adapter_id=a.id, slot=a.slot, size_bytes=a.nbytes,
                                loaded_at=a.loaded_at, last_used=a.last_used,
                                running_requests=a.in_use, requests=a.requests,
                                generated_tokens=a.tokens, source=a.source, kind=a.kind,
                                lora_rank=a.lora_rank, lora_target_modules=a.lora_targets)


def response(ev: TokenEvent, adapter_id: str, input_ids: list[int] | None,
             request) -> nora_pb2.GenerateResponse:
    out = nora_pb2.GenerateResponse(request_id=ev.request_id, text=ev.text,
                                    token_ids=ev.token_ids, adapter_id=adapter_id)
    if ev.logprobs is not None:
        out.logprobs.extend(ev.logprobs)
    for top in ev.top_logprobs or ():
        out.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
    if input_ids is not None and request.options.input_tokens:
        out.input_token_ids.extend(input_ids)
    if ev.finish_reason is not None:
        out.finish_reason = FINISH[ev.finish_reason][0]
        out.usage.prompt_tokens = ev.num_prompt_tokens
        out.usage.completion_tokens = ev.num_output_tokens
        if ev.error:
            out.error = ev.error
    if ev.queue_seconds is not None:
        out.usage.queue_seconds = ev.queue_seconds
    return out
