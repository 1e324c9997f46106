"""The request features beyond temperature/top-k/top-p on the real engine (the tiny test model
on CPU, its real loop thread): structured output (JSON object, JSON schema, regex) that parses
and validates, constrained and free rows sharing a batch with the same results as alone, bad
schemas refused before queueing, top logprobs, presence/frequency penalties, min-p,
min_new_tokens and prompt truncation from the left."""

from __future__ import annotations

import json
import queue
import re

import jsonschema
import pytest
import torch

from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.sampling import SamplingParams
from nora_runtime.structured import StructuredOutput
from nora_runtime.tiny import random_adapter, tiny_checkpoint

TIMEOUT = 120
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                            max_adapters=4, max_num_seqs=32, kv_cache_tokens_cpu=8192))
    from nora_runtime.adapter import adapter_to_bytes
    e.load_adapter("a", adapter_to_bytes(random_adapter(e.info, 1),
                                         base_fingerprint=e.info.fingerprint))
    e.start()
    yield e
    e.shutdown()


class Result:
    def __init__(self) -> None:
        self.events: list[TokenEvent] = []

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def reason(self) -> str | None:
        return self.events[-1].finish_reason

    @property
    def logprobs(self) -> list[float]:
        return [lp for e in self.events for lp in (e.logprobs or ())]

    @property
    def top(self) -> list:
        return [t for e in self.events for t in (e.top_logprobs or ())]


def run(engine: Engine, requests: list[tuple]) -> list[Result]:
    """(prompt, params, adapter) requests submitted together; every event of each."""
    results = [Result() for _ in requests]
    events: queue.SimpleQueue[tuple[int, TokenEvent]] = queue.SimpleQueue()
    for i, (prompt, params, adapter) in enumerate(requests):
        engine.submit(prompt, params, adapter=adapter,
                      on_event=lambda e, i=i: events.put((i, e)))
    pending = len(requests)
    while pending:
        i, e = events.get(timeout=TIMEOUT)
        results[i].events.append(e)
        pending -= e.finish_reason is not None
    return results


def alone(engine: Engine, prompt, params, adapter=None) -> Result:
    return run(engine, [(prompt, params, adapter)])[0]


def schema_params(seed: int, **kw) -> SamplingParams:
    kw = {"temperature": 1.0, "seed": seed, "max_new_tokens": 200,
          "structured": StructuredOutput.json_schema(SCHEMA), **kw}
    return SamplingParams(**kw)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_parses_and_validates(engine, seed):
    r = alone(engine, "Describe a person:", schema_params(seed))
    assert r.reason == "stop", r.text  # the grammar completed (no EOS needed)
    jsonschema.validate(json.loads(r.text), SCHEMA)
    assert r.text == engine.tokenizer.decode(r.tokens)  # the last token's text is output


def test_json_object_and_regex(engine):
    obj = alone(engine, "Hi", SamplingParams(temperature=0.7, seed=5, max_new_tokens=200,
                                             structured=StructuredOutput("json_object")))
    assert obj.reason == "stop" and isinstance(json.loads(obj.text), dict)
    for seed in (1, 2):
        rx = alone(engine, "Code:", SamplingParams(temperature=1.0, seed=seed, max_new_tokens=20,
                                                   structured=StructuredOutput("regex", REGEX)))
        assert re.fullmatch(REGEX, rx.text), rx.text
        assert rx.reason in ("stop", "eos")


def test_free_output_is_not_json(engine):
    """Not vacuous: the tiny model's free output under the same seed is no JSON."""
    free = alone(engine, "Describe a person:", SamplingParams(temperature=1.0, seed=1,
                                                              max_new_tokens=40))
    with pytest.raises(ValueError):
        json.loads(free.text)


def mixed_requests() -> list[tuple]:
    """Constrained (schema, regex, JSON object) and free rows, greedy and seeded, with top
    logprobs, the new penalties and min-p, on the base model and adapter "a"."""
    return [
        ("Describe a person:", schema_params(1), None),
        ("Hello", SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True), None),
        ("Describe a person:", schema_params(2, logprobs=True, top_logprobs=3), "a"),
        ("Code:", SamplingParams(temperature=0.9, seed=4, max_new_tokens=20,
                                 structured=StructuredOutput("regex", REGEX)), None),
        ("abc", SamplingParams(temperature=0.8, seed=9, max_new_tokens=20, ignore_eos=True,
                               presence_penalty=1.0, frequency_penalty=0.5, min_p=0.05,
                               logprobs=True, top_logprobs=2), "a"),
        ("Hi", SamplingParams(temperature=0, max_new_tokens=150,
                              structured=StructuredOutput("json_object")), None),
    ]


def test_constrained_and_free_rows_share_a_batch_as_if_alone(engine):
    reqs = mixed_requests()
    solo = [alone(engine, *r) for r in reqs]
    for order in (list(range(len(reqs))), list(range(len(reqs)))[::-1]):
        batched = run(engine, [reqs[i] for i in order])
        for j, i in enumerate(order):
            b, s = batched[j], solo[i]
            assert (b.tokens, b.text, b.reason) == (s.tokens, s.text, s.reason), (
                f"request {i} depends on its batch")
            # logprobs: equal up to the model's float differences between batch shapes
            assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)
            assert [[t for t, _ in top] for top in b.top] == [[t for t, _ in top]
                                                              for top in s.top]
    jsonschema.validate(json.loads(solo[2].text), SCHEMA)


@pytest.mark.parametrize("spec,match", [
    (StructuredOutput("json_schema", '{"type": "frobnicate"}'), "frobnicate"),
    (StructuredOutput("json_schema", '{"type": "object", "properties": {"a": {"$ref": '
                                     '"#/nope"}}}'), "json_schema"),
    (StructuredOutput("regex", "[a-"), "regex"),
])
def test_bad_specs_are_refused_before_queueing(engine, spec, match):
    with pytest.raises(ValueError, match=match):
        engine.submit("Hi", SamplingParams(structured=spec), on_event=lambda e: None)
    with pytest.raises(ValueError):
        engine.check_structured(spec)
    assert alone(engine, "Hi", SamplingParams(temperature=0, max_new_tokens=3)).reason


@pytest.mark.parametrize("kind,spec", [
    ("json_schema", "not json"), ("json_schema", "[1, 2]"), ("json_object", "{}"),
    ("regex", ""), ("xml", ""), ("regex", "x" * 70000),
])
def test_structured_output_values_are_checked(kind, spec):
    with pytest.raises(ValueError):
        StructuredOutput(kind, spec)


def test_top_logprobs(engine):
    p = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=True,
                       top_logprobs=5)
    r = alone(engine, "Hello", p)
    assert len(r.top) == len(r.tokens) == 8
    for token, lp, top in zip(r.tokens, r.logprobs, r.top, strict=True):
        assert len(top) == 5
        assert top[0][0] == token and top[0][1] == pytest.approx(lp)  # greedy: the best
        assert [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
    plain = alone(engine, "Hello", SamplingParams(temperature=0, max_new_tokens=8,
                                                  ignore_eos=True, logprobs=True))
    assert plain.tokens == r.tokens and plain.logprobs == r.logprobs and plain.top == []
    # masked tokens never show: a regex of digits lists only digits
    digits = alone(engine, "n", SamplingParams(
        temperature=0, max_new_tokens=4, logprobs=True, top_logprobs=20,
        structured=StructuredOutput("regex", "[0-9]{4}")))
    assert digits.reason in ("stop", "length") and digits.text.isdigit()
    for top in digits.top:
        assert 1 <= len(top) <= 10
        assert all(engine.tokenizer.decode([t]).isdigit() for t, _ in top)


def test_presence_and_frequency_penalties_reduce_repeats(engine):
    base = dict(temperature=0, max_new_tokens=40, ignore_eos=True)
    plain = alone(engine, "aaaa", SamplingParams(**base))
    penalised = alone(engine, "aaaa", SamplingParams(**base, presence_penalty=2.0,
                                                     frequency_penalty=2.0))
    assert len(set(penalised.tokens)) > len(set(plain.tokens))
    negative = alone(engine, "aaaa", SamplingParams(**base, frequency_penalty=-2.0))
    assert len(set(negative.tokens)) <= len(set(plain.tokens))


def test_min_new_tokens_masks_eos_and_stop_tokens(engine):
    free = alone(engine, "Hello", SamplingParams(temperature=0, max_new_tokens=30,
                                                 ignore_eos=True))
    stop_id = next(t for t in free.tokens if free.tokens.index(t) >= 2)
    first = free.tokens.index(stop_id)
    early = alone(engine, "Hello", SamplingParams(temperature=0, max_new_tokens=30,
                                                  stop_token_ids=(stop_id,)))
    assert early.reason == "stop" and early.tokens == free.tokens[:first + 1]
    held = alone(engine, "Hello", SamplingParams(temperature=0, max_new_tokens=30,
                                                 stop_token_ids=(stop_id,),
                                                 min_new_tokens=first + 3))
    assert len(held.tokens) >= first + 3 and stop_id not in held.tokens[:first + 2]
    assert not set(held.tokens[:first + 2]) & set(engine.eos_ids)
    assert held.tokens[:first] == free.tokens[:first]  # the same until the masked step
    assert held.tokens[first] != stop_id


def test_min_p_one_is_greedy(engine):
    greedy = alone(engine, "Hello", SamplingParams(temperature=0, max_new_tokens=12,
                                                   ignore_eos=True))
    for seed in (1, 2):
        p = SamplingParams(temperature=1.5, seed=seed, min_p=1.0, max_new_tokens=12,
                           ignore_eos=True)
        assert alone(engine, "Hello", p).tokens == greedy.tokens


def test_truncate_prompt_tokens_keeps_the_end(engine):
    ids = engine.tokenizer.encode("a long prompt whose start is cut off")
    p = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    cut = alone(engine, ids, SamplingParams(**{**p.__dict__, "truncate_prompt_tokens": 5}))
    assert cut.events[-1].num_prompt_tokens == 5
    assert cut.tokens == alone(engine, ids[-5:], p).tokens
    longer = alone(engine, ids, SamplingParams(**{**p.__dict__, "truncate_prompt_tokens": 999}))
    assert longer.tokens == alone(engine, ids, p).tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_constrained_and_free_rows_share_a_batch_as_if_alone():
    """On a GPU (Triton kernels, CUDA graphs): the masks move to the device per step; a mixed
    batch gives each request the tokens it gets alone, and the schema answers validate."""
    from nora_runtime.adapter import adapter_to_bytes

    e = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cuda", dtype="float32",
                            mode="replace", max_adapters=4, max_num_seqs=16, max_model_len=512,
                            kv_memory_fraction=0.05))
    try:
        e.load_adapter("a", adapter_to_bytes(random_adapter(e.info, 1),
                                             base_fingerprint=e.info.fingerprint))
        e.start()
        reqs = mixed_requests()
        solo = [alone(e, *r) for r in reqs]
        batched = run(e, reqs)
        for i, (s, b) in enumerate(zip(solo, batched, strict=True)):
            assert (b.tokens, b.reason) == (s.tokens, s.reason), f"request {i}"
        for i in (0, 2):
            jsonschema.validate(json.loads(solo[i].text), SCHEMA)
    finally:
        e.shutdown()
