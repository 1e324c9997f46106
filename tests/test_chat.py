"""Chat over gRPC, end to end on real servers on 127.0.0.1 (tests/test_server.py's ServerThread):
`messages` through the model's chat template, the one-input rule, the end-of-turn token,
sampling defaults from the model's generation config, the client's token-id inputs
(BatchEncoding, tensors, arrays), `nora generate --chat` and `nora chat` as processes, and the
default model (SmolLM2-135M-Instruct): its template's ids, its defaults, a right answer.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from test_serve_cli import command
from test_server import ServerThread, code_of
from transformers import AutoTokenizer

from nora_client import NoraClient
from nora_client.client import token_ids
from nora_proto.v1 import nora_pb2
from nora_runtime.chat import end_of_turn_ids
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.tiny import tiny_checkpoint

Code = grpc.StatusCode
GREEDY = dict(temperature=0, max_new_tokens=8)
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is nora?"}]


def tiny_engine(path: Path) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", max_num_seqs=8,
                               kv_cache_tokens_cpu=8192)).start()


@functools.cache
def tokenizer(checkpoint: Path):
    return AutoTokenizer.from_pretrained(checkpoint)


def template_ids(checkpoint: Path, messages) -> list[int]:
    """What transformers makes of a conversation: the ids the server must use."""
    tok = tokenizer(checkpoint)
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def variant(tmp: Path, *, generation: dict | None = None, eos: str | None = None) -> Path:
    """A copy of the tiny checkpoint with another generation_config.json and/or EOS token
    (in config, generation config and tokenizer; the chat template still ends turns with
    </s>)."""
    path = tmp / "tiny"
    shutil.copytree(tiny_checkpoint(), path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(generation or {})
    if eos is not None:
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
        tok_config["eos_token"] = eos
        (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
        eos_id = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(eos)
        config = json.loads((path / "config.json").read_text())
        config["eos_token_id"] = gen["eos_token_id"] = eos_id
        (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


@pytest.fixture(scope="module")
def engine():
    e = tiny_engine(tiny_checkpoint())
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def served(engine):
    s = ServerThread(engine)
    yield s
    s.close()


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A tiny model whose generation config says greedy (do_sample false, with a temperature
    HF generate would ignore) and whose EOS is <pad>, not its template's end of turn (</s>)."""
    path = variant(tmp_path_factory.mktemp("odd"), eos="<pad>",
                   generation={"do_sample": False, "temperature": 0.7})
    e = tiny_engine(path)
    s = ServerThread(e)
    yield s, e, path
    s.close()
    e.shutdown()


# ---- the tiny model ------------------------------------------------------------------------


def test_exactly_one_input(served):
    ids = nora_pb2.TokenIds(ids=[1, 2, 3])
    user = [nora_pb2.ChatMessage(role="user", content="Hi")]
    with served.client(retries=0) as nora:
        for request, got in [(nora_pb2.GenerateRequest(), "got none"),
                             (nora_pb2.GenerateRequest(prompt="Hi", messages=user),
                              "got prompt and messages"),
                             (nora_pb2.GenerateRequest(token_ids=ids, messages=user),
                              "got token_ids and messages")]:
            for rpc in (nora.stub.Generate, lambda r: list(nora.stub.GenerateStream(r))):
                code, message = code_of(rpc, request)
                assert code == Code.INVALID_ARGUMENT and got in message, message
                assert "exactly one of prompt, token_ids and messages" in message
        code, message = code_of(nora.stub.Tokenize,
                                nora_pb2.TokenizeRequest(text="Hi", messages=user))
        assert code == Code.INVALID_ARGUMENT and "not both" in message
        for bad, words in [([{"role": "", "content": "Hi"}], "role"),
                           ([{"role": "us\ner", "content": "Hi"}], "role"),
                           ([{"role": "r" * 65, "content": "Hi"}], "role")]:
            code, message = code_of(nora.generate, messages=bad)
            assert code == Code.INVALID_ARGUMENT and words in message, message
        # the client refuses what it can before sending anything
        for kw in ({}, dict(prompt="Hi", messages=CHAT)):
            with pytest.raises(ValueError, match="exactly one"):
                nora.generate(**kw)
        with pytest.raises(ValueError, match="exactly the keys"):
            nora.generate(messages=[{"role": "user", "content": "Hi", "name": "x"}])
        with pytest.raises(TypeError, match="messages="):
            nora.generate(CHAT)


def test_chat_is_the_template_ids_as_token_ids(served):
    ids = template_ids(tiny_checkpoint(), CHAT)
    with served.client() as nora:
        assert nora.tokenize(messages=CHAT) == ids
        chat = nora.generate(messages=CHAT, input_tokens=True, **GREEDY)
        by_ids = nora.generate(ids, **GREEDY)
        sampled = dict(temperature=0.9, seed=5, max_new_tokens=8)
        parts = list(nora.generate_stream(messages=CHAT, **sampled))
        sampled_ids = nora.generate(ids, **sampled)
    assert list(chat.input_token_ids) == ids and chat.usage.prompt_tokens == len(ids)
    assert list(chat.token_ids) == list(by_ids.token_ids) and chat.text == by_ids.text
    assert [t for p in parts for t in p.token_ids] == list(sampled_ids.token_ids)
    assert "".join(p.text for p in parts) == sampled_ids.text


def test_async_client_chat(served):
    import asyncio

    from nora_client import AsyncNoraClient

    async def main():
        async with AsyncNoraClient(served.target, timeout=60) as nora:
            unary = await nora.generate(messages=CHAT, **GREEDY)
            parts = [p async for p in nora.generate_stream(messages=CHAT, **GREEDY)]
            return unary, parts, await nora.tokenize(messages=CHAT)

    unary, parts, ids = asyncio.run(main())
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
    assert ids == template_ids(tiny_checkpoint(), CHAT)


def test_client_takes_token_ids_as_tokenizers_and_arrays_give_them(served):
    tok = tokenizer(tiny_checkpoint())
    encoding = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = list(encoding["input_ids"])
    inputs = [encoding, tok(["Hi there"], return_tensors="pt"), torch.tensor(ids),
              torch.tensor([ids]), np.array(ids), np.array([ids], dtype=np.int32),
              [np.int64(i) for i in ids], tuple(ids)]
    assert token_ids(inputs[1]) == tok("Hi there")["input_ids"]
    with served.client() as nora:
        want = list(nora.generate(ids, **GREEDY).token_ids)
        for prompt in inputs[:1] + inputs[2:]:
            assert list(nora.generate(prompt, **GREEDY).token_ids) == want, type(prompt)
        assert nora.generate(inputs[1], **GREEDY).usage.prompt_tokens == len(token_ids(
            inputs[1]))
        with pytest.raises(ValueError, match="batch of 2"):
            nora.generate(torch.tensor([ids, ids]))
        with pytest.raises(TypeError):
            nora.generate(torch.tensor([1.0, 2.0]))


def test_model_info_shows_default_sampling_and_chat(served):
    with served.client() as nora:
        info = nora.model_info()
    s = info.default_sampling  # the tiny checkpoint's generation config sets no sampling
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert not s.HasField("seed") and info.default_max_new_tokens == 64 and info.chat_template


def test_generation_config_sets_the_default_sampling(odd):
    """do_sample false in generation_config.json: unset temperature means greedy (even with a
    temperature in the config, as HF generate does)."""
    s, _, _ = odd
    with s.client() as nora:
        assert nora.model_info().default_sampling.temperature == 0
        greedy = nora.generate("Hello", max_new_tokens=12, ignore_eos=True, temperature=0)
        default = nora.generate("Hello", max_new_tokens=12, ignore_eos=True)
        sampled = nora.generate("Hello", max_new_tokens=12, ignore_eos=True, temperature=1.0,
                                seed=3)
    assert list(default.token_ids) == list(greedy.token_ids)
    assert list(sampled.token_ids) != list(greedy.token_ids)  # a request's own value wins


def test_chat_stops_at_the_end_of_turn_token_when_it_is_not_eos(odd):
    """A model whose EOS (<pad>) is not its template's end-of-turn token (</s>): a chat answer
    still ends at </s>, reported as EOS; a plain prompt generates through it."""
    s, e, path = odd
    eot, pad = e.tokenizer.convert_tokens_to_ids(["</s>", "<pad>"])
    assert e.eos_ids == (pad,) and end_of_turn_ids(e.tokenizer) == (eot,)
    ids = template_ids(path, CHAT)
    with s.client() as nora:
        # the first seed whose near-uniform draws (temperature 5) reach </s> before <pad>
        # (about one in five within 60 tokens; the 5th, seed 4, for today's tiny model)
        for seed in range(64):
            probe = nora.generate(ids, temperature=5.0, seed=seed, max_new_tokens=60,
                                  stop_token_ids=[eot, pad])
            if probe.token_ids[-1] == eot:
                break
        else:
            pytest.fail("no seed reached </s>")
        want = list(probe.token_ids)
        kw = dict(temperature=5.0, seed=seed, max_new_tokens=len(want) + 4)
        chat = nora.generate(messages=CHAT, **kw)
        assert list(chat.token_ids) == want
        assert chat.finish_reason == nora_pb2.FINISH_REASON_EOS
        plain = list(nora.generate(ids, **kw).token_ids)
        assert plain[:len(want)] == want and len(plain) > len(want)
        # ignore_eos: the end of turn is ignored too
        free = list(nora.generate(ids, ignore_eos=True, **kw).token_ids)
        assert list(nora.generate(messages=CHAT, ignore_eos=True, **kw).token_ids) == free
        assert len(free) == len(want) + 4


def test_messages_to_a_model_without_a_chat_template(tmp_path):
    path = variant(tmp_path)
    (path / "chat_template.jinja").unlink()
    e = tiny_engine(path)
    s = ServerThread(e)
    try:
        with s.client(retries=0) as nora:
            assert not nora.model_info().chat_template
            for call in (lambda: nora.generate(messages=CHAT),
                         lambda: nora.tokenize(messages=CHAT)):
                code, message = code_of(call)
                assert code == Code.FAILED_PRECONDITION and "no chat template" in message
            assert nora.generate("Hi", max_new_tokens=2).usage.completion_tokens >= 1
    finally:
        s.close()
        e.shutdown()


# ---- the command line ----------------------------------------------------------------------


def nora_cli(target: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """`nora --target TARGET ARGS` as a process; bytes decoded here, so that a \\r the random
    model writes stays a \\r."""
    out = subprocess.run([*command("nora", "nora_client.cli"), "--target", target, *args],
                         input=stdin, capture_output=True, timeout=120)
    return out.returncode, out.stdout.decode(), out.stderr.decode()


def test_nora_generate_chat(served):
    flags = ("--temperature", "0", "--max-new-tokens", "6")
    code, out, err = nora_cli(served.target, "generate", "--chat", "--system", "Be brief.",
                              "What is nora?", *flags)
    assert code == 0, err
    with served.client() as nora:
        want = nora.generate(messages=[CHAT[0], CHAT[3]], **GREEDY | {"max_new_tokens": 6})
        ids = nora.tokenize(messages=[{"role": "user", "content": "Hi"}])
    assert out == want.text + "\n"
    assert f"{want.usage.prompt_tokens} prompt + 6 generated tokens" in err
    code, out, err = nora_cli(served.target, "tokenize", "--chat", "Hi")
    assert code == 0 and out.split() == [str(i) for i in ids], err


def test_nora_chat_keeps_the_conversation(served):
    """Two turns through a pipe, then /exit: the second answer is the one to the whole
    conversation, first answer included."""
    flags = ("--temperature", "0", "--max-new-tokens", "6", "--system", "Be brief.")
    stdin = b"Hi there\n\nWhat is nora?\n/exit\nnever sent\n"
    code, out, err = nora_cli(served.target, "chat", *flags, stdin=stdin)
    assert code == 0, err
    greedy = GREEDY | {"max_new_tokens": 6}
    with served.client() as nora:
        first = nora.generate(messages=CHAT[:2], **greedy).text
        history = [*CHAT[:2], {"role": "assistant", "content": first}, CHAT[3]]
        second = nora.generate(messages=history, **greedy).text
    assert out == f"{first}\n{second}\n"
    assert err.count("[length:") == 2  # answers cut short say so (the tiny model rambles)


def test_nora_chat_drops_a_refused_message_and_goes_on(served):
    big = b"x" * 5000 + b"\n"  # over the input limit (4095 tokens): refused, not kept
    code, out, err = nora_cli(served.target, "chat", "--temperature", "0", "--max-new-tokens",
                              "4", stdin=big + b"Hi there\n")
    assert code == 0 and "INVALID_ARGUMENT" in err and "message dropped" in err
    with served.client() as nora:
        want = nora.generate(messages=[CHAT[1]], temperature=0, max_new_tokens=4).text
    assert out == want + "\n"


# ---- the default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct, served (its converted checkpoint is cached under NORA_CACHE)."""
    e = Engine(EngineConfig(device="cpu", max_num_seqs=4, kv_cache_tokens_cpu=4096)).start()
    s = ServerThread(e)
    yield s, e
    s.close()
    e.shutdown()


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello!"}],
    CHAT,
    [{"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "And back, with émojis 🙂?"}],
]


def test_default_model_tokenizes_messages_as_transformers_does(smol):
    s, engine = smol
    from nora_runtime.checkpoint import default_checkpoint

    with s.client() as nora:
        for messages in CONVERSATIONS:
            assert nora.tokenize(messages=messages) == template_ids(default_checkpoint(),
                                                                    messages)
        info = nora.model_info()
    # its end of turn, <|im_end|>, is its EOS: chat answers end there with no extra stop
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(engine.tokenizer) == (im_end,) and im_end in engine.eos_ids
    assert list(info.eos_token_ids) == [im_end] and info.chat_template
    d = info.default_sampling  # the converted checkpoint's generation config
    assert (round(d.temperature, 6), round(d.top_p, 6), d.top_k) == (0.2, 0.9, 0)


def test_default_model_answers_a_question(smol):
    s, _ = smol
    with s.client() as nora:
        reply = nora.generate(messages=CONVERSATIONS[0], temperature=0, max_new_tokens=24)
    assert "Paris" in reply.text, reply.text
    assert reply.finish_reason in (nora_pb2.FINISH_REASON_EOS, nora_pb2.FINISH_REASON_LENGTH)


def test_client_errors_before_sending(served):
    with NoraClient(served.target) as nora:
        with pytest.raises(TypeError, match="'input_ids'"):
            nora.generate({"ids": [1]})
        with pytest.raises(ValueError, match="exactly one of text and messages"):
            nora.tokenize("Hi", messages=CHAT)
