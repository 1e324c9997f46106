"""The request features beyond temperature/top-k/top-p through both edges of a real server
(test_server.py's ServerThread on 127.0.0.1, the tiny model on CPU): over gRPC with nora_client
(n, top logprobs, penalties, min_p, min_new_tokens, input truncation, structured output and
their INVALID_ARGUMENTs) and over HTTP with the official openai SDK (response_format
json_object / json_schema whose answers parse and validate with jsonschema, top_logprobs, n,
the vLLM-named extras), the two edges agreeing on the same request."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest
from test_server import ServerThread, code_of

from nora_proto.v1 import nora_pb2
from nora_runtime.adapter import adapter_to_bytes
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.tiny import random_adapter, tiny_checkpoint

Code = grpc.StatusCode
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                            max_adapters=8, max_num_seqs=32, kv_cache_tokens_cpu=16384)).start()
    e.load_adapter("a", adapter_to_bytes(random_adapter(e.info, 1),
                                         base_fingerprint=e.info.fingerprint))
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def served(engine):
    s = ServerThread(engine)
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.server.http_port}/v1",
                         api_key="unused", max_retries=0, timeout=120)


# ---- gRPC ------------------------------------------------------------------------------------


def test_n_sequences_unary_and_streamed(served):
    kw = dict(temperature=1.0, seed=11, max_new_tokens=10, ignore_eos=True, logprobs=True)
    with served.client() as nora:
        one = nora.generate("Hello", **kw)
        three = nora.generate("Hello", n=3, request_id="r3", input_tokens=True, **kw)
        parts = list(nora.generate_stream("Hello", n=3, **kw))
    assert not three.text and not three.token_ids  # the sequences are in choices
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.text for c in three.choices]
    assert texts[0] == one.text and len(set(texts)) == 3  # seed, then seeds derived from it
    assert all(c.finish_reason == nora_pb2.FINISH_REASON_LENGTH for c in three.choices)
    assert all(len(c.logprobs) == len(c.token_ids) == 10 for c in three.choices)
    assert three.request_id == "r3" and list(three.input_token_ids)
    assert three.usage.completion_tokens == 30
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    for i in range(3):
        mine = [p for p in parts if p.index == i]
        assert "".join(p.text for p in mine) == texts[i]
        assert mine[-1].finish_reason == nora_pb2.FINISH_REASON_LENGTH
        assert mine[-1].usage.completion_tokens == 10
    assert len({p.request_id for p in parts}) == 1


def test_top_logprobs_over_grpc(served):
    with served.client() as nora:
        reply = nora.generate("Hello", temperature=0, max_new_tokens=6, ignore_eos=True,
                              top_logprobs=4)
        parts = list(nora.generate_stream("Hello", temperature=0, max_new_tokens=6,
                                          ignore_eos=True, top_logprobs=4))
    assert len(reply.top_logprobs) == len(reply.token_ids) == len(reply.logprobs) == 6
    for token, lp, top in zip(reply.token_ids, reply.logprobs, reply.top_logprobs,
                              strict=True):
        assert len(top.token_ids) == len(top.logprobs) == 4
        assert top.token_ids[0] == token and top.logprobs[0] == pytest.approx(lp)
        assert list(top.logprobs) == sorted(top.logprobs, reverse=True)
    assert [t for p in parts for t in p.top_logprobs] == list(reply.top_logprobs)


def test_structured_output_over_grpc(served):
    with served.client() as nora:
        for seed in (1, 2):
            reply = nora.generate(messages=CHAT, temperature=1.0, seed=seed,
                                  max_new_tokens=200, json_schema=SCHEMA, adapter_id="a")
            assert reply.finish_reason == nora_pb2.FINISH_REASON_STOP, reply.text
            jsonschema.validate(json.loads(reply.text), SCHEMA)
        obj = nora.generate("Hi", temperature=0.5, seed=3, max_new_tokens=200,
                            json_object=True)
        assert isinstance(json.loads(obj.text), dict)
        rx = nora.generate("Hi", temperature=1.0, seed=3, max_new_tokens=20,
                           regex=r"(yes|no), [0-9]{2}")
        assert re.fullmatch(r"(yes|no), [0-9]{2}", rx.text), rx.text
        # n constrained sequences, streamed: each valid
        parts = list(nora.generate_stream(messages=CHAT, temperature=1.0, seed=5, n=2,
                                          max_new_tokens=200, json_schema=SCHEMA))
    for i in (0, 1):
        jsonschema.validate(json.loads("".join(p.text for p in parts if p.index == i)), SCHEMA)


def test_penalties_min_p_and_min_new_tokens_over_grpc(served, engine):
    base = dict(temperature=0, max_new_tokens=30, ignore_eos=True)
    with served.client() as nora:
        plain = nora.generate("aaaa", **base)
        penalised = nora.generate("aaaa", presence_penalty=2.0, frequency_penalty=2.0, **base)
        assert len(set(penalised.token_ids)) > len(set(plain.token_ids))
        sampled = nora.generate("aaaa", temperature=1.3, seed=4, min_p=1.0, max_new_tokens=30,
                                ignore_eos=True)
        assert sampled.token_ids == plain.token_ids  # min_p 1 keeps only the best token
        stop_id = plain.token_ids[0]
        early = nora.generate("aaaa", temperature=0, max_new_tokens=30,
                              stop_token_ids=[stop_id])
        held = nora.generate("aaaa", temperature=0, max_new_tokens=30, stop_token_ids=[stop_id],
                             min_new_tokens=8)
    assert len(early.token_ids) == 1 and early.finish_reason == nora_pb2.FINISH_REASON_STOP
    assert len(held.token_ids) >= 8 and stop_id not in held.token_ids[:7]


def test_truncate_input_tokens(engine):
    s = ServerThread(engine, max_input_tokens=8)
    try:
        with s.client() as nora:
            ids = nora.tokenize("a prompt much longer than eight tokens")
            code, message = code_of(nora.generate, ids, max_new_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "the limit is 8" in message
            cut = nora.generate(ids, max_new_tokens=4, temperature=0, truncate_input_tokens=8,
                                input_tokens=True)
            assert list(cut.input_token_ids) == ids[-8:] and cut.usage.prompt_tokens == 8
            assert cut.text == nora.generate(ids[-8:], max_new_tokens=4, temperature=0).text
    finally:
        s.close()


def test_bad_feature_values_are_invalid_argument(served):
    bad = [
        (dict(n=17), "n must be in [1, 16]"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"),
        (dict(json_schema={"type": "nonsense"}), "json_schema"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(regex="(unclosed"), "regex"),
    ]
    with served.client() as nora:
        for kw, words in bad:
            code, message = code_of(nora.generate, "Hi", **kw)
            assert code == Code.INVALID_ARGUMENT and words in message, (kw, message)
        raw = nora_pb2.GenerateRequest(prompt="Hi")
        raw.options.top_logprobs = 2  # without logprobs
        code, message = code_of(nora.stub.Generate, raw)
        assert code == Code.INVALID_ARGUMENT and "top_logprobs needs logprobs" in message
        raw = nora_pb2.GenerateRequest(prompt="Hi")
        raw.response_format.json_object = False
        code, message = code_of(nora.stub.Generate, raw)
        assert code == Code.INVALID_ARGUMENT and "json_object must be true" in message
        assert nora.generate("Hi", max_new_tokens=2).usage.completion_tokens  # still serving


def test_n_counts_against_the_request_limit(engine):
    s = ServerThread(engine, max_concurrent_requests=2)
    try:
        with s.client() as nora:
            code, message = code_of(nora.generate, "Hi", n=3, max_new_tokens=2)
            assert code == Code.INVALID_ARGUMENT and "3 generations" in message
            assert len(nora.generate("Hi", n=2, max_new_tokens=2).choices) == 2
    finally:
        s.close()


# ---- HTTP (openai SDK) -------------------------------------------------------------------------


def schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                   "strict": True}}


def test_json_schema_output_parses_and_validates(api, engine, served):
    base = engine.info.name
    for seed in (1, 2, 3):
        out = api.chat.completions.create(model=base, messages=CHAT, temperature=1.0, seed=seed,
                                          max_tokens=200, response_format=schema_format())
        text = out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    # streamed: the same text; gRPC with the same request: the same text
    chunks = list(api.chat.completions.create(model=base, messages=CHAT, temperature=1.0,
                                              seed=3, max_tokens=200, stream=True,
                                              response_format=schema_format()))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    with served.client() as nora:
        assert nora.generate(messages=CHAT, temperature=1.0, seed=3, max_new_tokens=200,
                             json_schema=SCHEMA).text == text
    # n choices, all valid; and on completions too
    two = api.chat.completions.create(model="a", messages=CHAT, temperature=1.0, seed=9, n=2,
                                      max_tokens=200, response_format=schema_format())
    for choice in two.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    comp = api.completions.create(model=base, prompt="JSON:", temperature=0.7, seed=1,
                                  max_tokens=200,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(comp.choices[0].text), dict)


def test_json_object_mode(api, engine):
    out = api.chat.completions.create(model=engine.info.name, messages=CHAT, temperature=0,
                                      max_tokens=200, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_bad_response_formats_are_400(api, engine):
    base = engine.info.name
    bad = [
        (schema_format({"type": "nonsense"}), "json_schema"),
        ({"type": "json_schema"}, "json_schema"),
        (schema_format([1, 2]), "schema"),
        ({"type": "yaml"}, "response_format"),
        ("json", "response_format"),
    ]
    for fmt, words in bad:
        with pytest.raises(openai.BadRequestError, match=words):
            api.chat.completions.create(model=base, messages=CHAT, max_tokens=2,
                                        response_format=fmt)
    assert api.chat.completions.create(model=base, messages=CHAT, max_tokens=2,
                                       response_format={"type": "text"}).choices


def test_top_logprobs_over_http(api, engine, served):
    base = engine.info.name
    out = api.chat.completions.create(model=base, messages=CHAT, temperature=0, max_tokens=6,
                                      logprobs=True, top_logprobs=3,
                                      extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    with served.client() as nora:
        reply = nora.generate(messages=CHAT, temperature=0, max_new_tokens=6, ignore_eos=True,
                              top_logprobs=3)
    assert [[x.logprob for x in e.top_logprobs] for e in content] == [
        pytest.approx(list(t.logprobs), abs=1e-5) for t in reply.top_logprobs]
    comp = api.completions.create(model=base, prompt="Hello", temperature=0, max_tokens=4,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.top_logprobs) == 4 and all(1 <= len(d) <= 2 for d in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=base, messages=CHAT, max_tokens=2, logprobs=True,
                                    top_logprobs=21)


def test_penalties_and_vllm_extras_over_http(api, engine, served):
    base = engine.info.name
    kw = dict(model=base, prompt="aaaa", temperature=0, max_tokens=20)
    plain = api.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    penalised = api.completions.create(**kw, presence_penalty=2.0, frequency_penalty=2.0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    assert len(set(penalised)) > len(set(plain))
    with served.client() as nora:
        assert nora.generate("aaaa", temperature=0, max_new_tokens=20, ignore_eos=True,
                             presence_penalty=2.0, frequency_penalty=2.0).text == penalised
    greedy = api.completions.create(**kw, extra_body={"ignore_eos": True,
                                                      "min_p": 1.0}).choices[0].text
    assert greedy == plain
    held = api.completions.create(**kw, extra_body={"min_tokens": 15})
    assert held.usage.completion_tokens >= 15
    ids = engine.tokenizer.encode("a long prompt cut down to its last six tokens")
    cut = api.completions.create(model=base, prompt=ids, temperature=0, max_tokens=4,
                                 extra_body={"truncate_prompt_tokens": 6})
    assert cut.usage.prompt_tokens == 6
    assert cut.choices[0].text == api.completions.create(
        model=base, prompt=ids[-6:], temperature=0, max_tokens=4).choices[0].text
    for extra in ({"min_p": 2}, {"min_tokens": -1}, {"truncate_prompt_tokens": 0},
                  {"presence_penalty": 9}):
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model=base, prompt="Hi", max_tokens=2, extra_body=extra)


def test_nora_cli_json_schema(served, tmp_path):
    import subprocess

    from test_serve_cli import command

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    out = subprocess.run([*command("nora", "nora_client.cli"), "--target", served.target,
                          "generate", "--chat", "Describe a person.", "--json-schema",
                          str(schema), "--temperature", "1", "--seed", "4",
                          "--max-new-tokens", "200", "--presence-penalty", "0.5"],
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    jsonschema.validate(json.loads(out.stdout.decode()), SCHEMA)
