"""The engine end to end on CPU: a tiny random Llama saved to disk, real adapters, the real loop
thread. Batched generation equals each request alone (mixed adapters, any batch composition and
order, under KV preemption), greedy output equals transformers' own model, stopping rules,
aborts free their blocks, adapters swap under running requests, errors stay with their request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from nora_runtime.adapter import AdapterFormatError, NoraAdapter, adapter_to_bytes
from nora_runtime.config import EngineConfig
from nora_runtime.convert import convert_model
from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.rational import base_coefficients
from nora_runtime.registry import AdapterNotFound, RegistryFull
from nora_runtime.sampling import SamplingParams
from nora_runtime.tiny import byte_tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
PROMPTS = ["Hello", "abc def", "xyz", "the cat", "nora", "0123", "tenant"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer Llama with weights large enough (std 0.1) that greedy outputs vary."""
    path = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                      tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def make_engine(checkpoint, store=None, **kw) -> Engine:
    cfg = dict(model=str(checkpoint), device="cpu", block_size=4, kv_cache_tokens_cpu=1024,
               max_adapters=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), adapter_store=store)


def adapter(engine: Engine, seed: int) -> bytes:
    """Adapter bytes for `engine`'s model whose coefficients clearly differ from the base."""
    torch.manual_seed(seed)
    m = NoraAdapter(base_coefficients("silu"), rank=3, alpha=6.0, groups=8,
                    site_names=[f"model.layers.{i}.mlp.act_fn" for i in range(2)], act="silu",
                    mode=engine.config.mode)
    with torch.no_grad():
        m.num_B.normal_(0.0, 0.3)
        m.den_B.normal_(0.0, 0.3)
    return adapter_to_bytes(m, base_fingerprint=engine.info.fingerprint)


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
        return self.events[-1].finish_reason if self.events else None


def run(engine: Engine, requests: list[tuple], start: bool = True) -> list[Result]:
    """Submit (prompt, params, adapter) requests all at once, then start the engine (so they
    share their first steps) and wait for every last event."""
    results = [Result() for _ in requests]
    events: queue.SimpleQueue[tuple[int, TokenEvent]] = queue.SimpleQueue()
    for i, (prompt, params, adapter_id) in enumerate(requests):
        engine.submit(prompt, params, adapter=adapter_id,
                      on_event=lambda e, i=i: events.put((i, e)))
    if start:
        engine.start()
    pending = len(requests)
    while pending:
        i, e = events.get(timeout=TIMEOUT)
        results[i].events.append(e)
        pending -= e.finish_reason is not None
    return results


def alone(engine: Engine, prompt, params, adapter_id=None) -> Result:
    return run(engine, [(prompt, params, adapter_id)])[0]


def wait_idle(engine: Engine) -> None:
    end = time.monotonic() + TIMEOUT
    while engine.stats().num_running or engine.stats().num_waiting:
        assert time.monotonic() < end, "engine did not become idle"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(checkpoint):
    """A started engine with adapters "a" and "b" loaded, shared by the read-only tests."""
    e = make_engine(checkpoint)
    e.load_adapter("a", adapter(e, 1))
    e.load_adapter("b", adapter(e, 2))
    e.start()
    yield e
    e.shutdown()


def mixed_requests() -> list[tuple]:
    """Greedy and seeded sampled requests over the base and two adapters."""
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=20)
    reqs = []
    for i, p in enumerate(PROMPTS):
        params = GREEDY if i % 2 == 0 else sampled
        reqs.append((p, params, (None, "a", "b")[i % 3]))
    return reqs


def test_greedy_matches_transformers(checkpoint, served):
    """The engine's greedy tokens and logprobs are those of transformers' model with the same
    activation conversion (no adapter)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    convert_model(model, mode=served.config.mode)
    params = SamplingParams(temperature=0, max_new_tokens=12, logprobs=True, ignore_eos=True)
    for prompt in PROMPTS[:3]:
        got = alone(served, prompt, params)
        ids = served.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True)
        assert got.tokens == ref.sequences[0, len(ids):].tolist()
        ref_lp = [lg[0].log_softmax(-1)[t].item() for lg, t in zip(ref.logits, got.tokens,
                                                                    strict=True)]
        got_lp = [lp for e in got.events for lp in (e.logprobs or ())]
        assert got_lp == pytest.approx(ref_lp, abs=1e-4)


def test_batched_equals_alone_with_mixed_adapters(served):
    reqs = mixed_requests()
    solo = [alone(served, *r) for r in reqs]
    batched = run(served, reqs)
    for s, b in zip(solo, batched, strict=True):
        assert b.tokens == s.tokens and b.text == s.text and b.reason == s.reason
    # not vacuous: adapters change the output of the same prompt
    outs = {alone(served, PROMPTS[0], GREEDY, a).text for a in (None, "a", "b")}
    assert len(outs) == 3


def test_results_independent_of_batch_composition_and_order(served):
    reqs = mixed_requests()
    forward = run(served, reqs)
    backward = run(served, reqs[::-1])[::-1]
    for f, b in zip(forward, backward, strict=True):
        assert f.tokens == b.tokens and f.text == b.text
    # request 0 next to other companions, and with a duplicate of itself
    others = [("zzz top", GREEDY, "b"), (PROMPTS[0], GREEDY, "a"), reqs[0]]
    again = run(served, [reqs[0], *others])
    assert again[0].tokens == forward[0].tokens
    assert again[3].tokens == forward[0].tokens


def test_same_seed_same_text(served):
    params = SamplingParams(temperature=1.0, seed=123, max_new_tokens=24, ignore_eos=True)
    first = alone(served, "Hello", params, "a").text
    assert alone(served, "Hello", params, "a").text == first
    other = SamplingParams(temperature=1.0, seed=124, max_new_tokens=24, ignore_eos=True)
    assert alone(served, "Hello", other, "a").text != first


def test_stopping_rules(served):
    free = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    full = alone(served, "nora", free)
    assert full.reason == "length" and len(full.tokens) == 24
    assert full.text == served.tokenizer.decode(full.tokens)

    # a stop string: the text before it, and finish "stop"
    stopped = alone(served, "nora", SamplingParams(temperature=0, max_new_tokens=24,
                                                   ignore_eos=True, stop=("MM",)))
    assert stopped.reason == "stop" and "MM" in full.text
    assert stopped.text == full.text[:full.text.index("MM")]

    # a stop token: emitted as a token id, its text not output
    stop_id = full.tokens[5]
    j = full.tokens.index(stop_id)
    by_id = alone(served, "nora", SamplingParams(temperature=0, max_new_tokens=24,
                                                 stop_token_ids=(stop_id,)))
    assert by_id.reason == "stop" and by_id.tokens == full.tokens[:j + 1]
    assert by_id.text == served.tokenizer.decode(full.tokens[:j])

    # EOS: "xyz" greedily reaches </s> (257) within 24 tokens; ignore_eos runs past it
    eos = alone(served, "xyz", GREEDY)
    assert eos.reason == "eos" and eos.tokens[-1] == 257 and len(eos.tokens) < 24
    assert "</s>" not in eos.text
    past = alone(served, "xyz", SamplingParams(temperature=0, max_new_tokens=24,
                                               ignore_eos=True))
    assert past.reason == "length" and past.tokens[:len(eos.tokens)] == eos.tokens


def test_max_model_len_caps_generation(checkpoint):
    e = make_engine(checkpoint, max_model_len=12)
    try:
        r = alone(e, list(range(1, 9)), SamplingParams(temperature=0, max_new_tokens=100,
                                                       ignore_eos=True))
        assert r.reason == "length" and len(r.tokens) == 4
        with pytest.raises(ValueError, match="max_model_len"):
            e.submit(list(range(1, 13)), GREEDY, on_event=print)
    finally:
        e.shutdown()


def test_deadline_ends_request_with_time_limit(served):
    params = SamplingParams(temperature=0, max_new_tokens=1000, ignore_eos=True)
    res = Result()
    for ev in served.generate("Hello", params, deadline=time.monotonic() - 1):
        res.events.append(ev)
    assert res.reason == "time_limit" and res.tokens == []
    res = Result()
    for ev in served.generate("Hello", params, deadline=time.monotonic() + 0.3):
        res.events.append(ev)
    assert res.reason == "time_limit" and 0 < len(res.tokens) < 1000


def test_abort_frees_blocks_within_one_step(served):
    blocks = served.scheduler.allocator.num_blocks
    params = SamplingParams(temperature=0, max_new_tokens=500, ignore_eos=True)
    it = served.generate("abc def", params, request_id="long")
    first = next(it)
    assert first.finish_reason is None
    served.abort("long")
    rest = list(it)
    assert rest[-1].finish_reason == "abort"
    assert sum(len(e.token_ids) for e in rest) <= 1  # at most the step already in flight
    assert served.scheduler.allocator.num_free == blocks
    assert served.stats().num_running == 0

    # closing the iterator early aborts too
    it = served.generate("abc def", params)
    next(it)
    it.close()
    wait_idle(served)
    assert served.scheduler.allocator.num_free == blocks


def test_kv_exhaustion_preempts_and_every_request_finishes(checkpoint):
    """48 KV tokens for four 5 + 24 token requests: admission fits them all, decoding runs out
    of blocks, the newest are preempted and recomputed; outputs stay as if each ran alone."""
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=5, max_new_tokens=24, ignore_eos=True)
    reqs = [("Hello", params, None), ("abc d", sampled, None), ("xyzzy", params, None),
            ("0123", sampled, None)]
    big = make_engine(checkpoint)
    small = make_engine(checkpoint, kv_cache_tokens_cpu=48)
    try:
        solo = [alone(big, *r) for r in reqs]
        batched = run(small, reqs)
        assert small.stats().preemptions > 0
        for s, b in zip(solo, batched, strict=True):
            assert b.reason == "length" and b.tokens == s.tokens
        assert small.scheduler.allocator.num_free == small.scheduler.allocator.num_blocks
        assert small.info.max_model_len == 48  # capped to the cache: a sequence always fits
        capped = alone(small, "Hello", SamplingParams(max_new_tokens=60, ignore_eos=True))
        assert capped.reason == "length" and len(capped.tokens) == 48 - 5
    finally:
        big.shutdown()
        small.shutdown()


def test_lru_never_evicts_an_adapter_in_use(checkpoint, tmp_path):
    """Named adapters in a durable store share the slots LRU (never one in use); an evicted
    one is reloaded on its next use with the same output (issue 10: dynamic loading)."""
    e = make_engine(checkpoint, store=tmp_path, max_adapters=2).start()
    try:
        long = SamplingParams(temperature=0, max_new_tokens=300, ignore_eos=True)
        e.load_adapter("a", adapter(e, 1))
        reference = alone(e, "Hello", long, "a").tokens
        e.load_adapter("b", adapter(e, 2))
        ref_b = alone(e, "Hello", GREEDY, "b").tokens
        it = e.generate("Hello", long, adapter="a")
        next(it)  # "a" is in use from here on; "b" is idle
        e.load_adapter("c", adapter(e, 3))  # evicts the idle "b", never "a"
        assert {i.id for i in e.list_adapters() if i.resident} == {"a", "c"}
        it_c = e.generate("abc", long, adapter="c")
        next(it_c)  # both slots in use now
        assert not e.load_adapter("d", adapter(e, 4)).resident  # stored, loaded on use
        with pytest.raises(RegistryFull):
            e.submit("Hello", GREEDY, adapter="d", on_event=print)
        it_c.close()
        rest = [t for ev in it for t in ev.token_ids]
        assert [reference[0]] + rest == reference  # "a" kept its coefficients throughout
        wait_idle(e)
        assert alone(e, "Hello", GREEDY, "b").tokens == ref_b  # reloaded from the store
        stats = e.stats()
        assert (stats.adapter_evictions, stats.adapter_reloads) == (2, 1)
        assert stats.adapters_registered == 4
    finally:
        e.shutdown()


def test_replace_and_unload_under_a_running_request(checkpoint):
    e = make_engine(checkpoint).start()
    try:
        long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
        v1, v2 = adapter(e, 1), adapter(e, 2)
        e.load_adapter("x", v2)
        ref2 = alone(e, "Hello", long, "x").tokens
        e.load_adapter("x", v1)
        ref1 = alone(e, "Hello", long, "x").tokens
        assert ref1 != ref2

        it = e.generate("Hello", long, adapter="x")
        first = next(it).token_ids
        e.load_adapter("x", v2)  # requests from now on get v2; the running one keeps v1
        assert alone(e, "Hello", long, "x").tokens == ref2
        e.unload_adapter("x")
        with pytest.raises(AdapterNotFound):
            e.submit("Hello", long, adapter="x", on_event=print)
        assert list(first) + [t for ev in it for t in ev.token_ids] == ref1
    finally:
        e.shutdown()


def test_inline_adapter_equals_loaded_and_is_deduplicated(served):
    data = adapter(served, 1)  # the bytes of "a"'s coefficients
    loaded = alone(served, "tenant", GREEDY, "a")
    r1, r2 = run(served, [("tenant", GREEDY, data), ("tenant", GREEDY, data)])
    assert r1.tokens == r2.tokens == loaded.tokens
    inline = [i for i in served.list_adapters() if i.id.startswith("sha256:")]
    assert len(inline) == 1 and inline[0].requests == 2


def test_bad_requests_raise_and_leave_the_engine_serving(served):
    def submit(prompt, params=GREEDY, **kw):
        return served.submit(prompt, params, on_event=lambda e: None, **kw)

    with pytest.raises(ValueError, match="empty prompt"):
        submit("")
    with pytest.raises(ValueError, match="token ids"):
        submit([1, 2, 9999])
    with pytest.raises(ValueError, match="token ids"):
        submit([1, True])
    with pytest.raises(AdapterNotFound):
        submit("hi", adapter="nope")
    with pytest.raises(AdapterFormatError):
        submit("hi", adapter=b"not an adapter")
    with pytest.raises(TypeError):
        submit("hi", {"temperature": 0})
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    it = served.generate("Hello", SamplingParams(temperature=0, max_new_tokens=100),
                         request_id="dup")
    next(it)
    with pytest.raises(ValueError, match="already in flight"):
        submit("Hello", request_id="dup")
    it.close()
    assert alone(served, "Hello", GREEDY).reason in ("length", "eos")
    assert all(i.in_use == 0 for i in served.list_adapters())  # failed submits released slots


def test_failing_callback_does_not_disturb_other_requests(served):
    def boom(event):
        raise RuntimeError("client went away")

    served.submit("Hello", GREEDY, on_event=boom)
    good = alone(served, "abc def", GREEDY)
    assert good.reason in ("length", "eos") and good.tokens
    wait_idle(served)


def test_generate_async_streams_concurrently_and_cancel_aborts(served):
    solo = [alone(served, p, GREEDY, a) for p, a in (("Hello", "a"), ("xyz", "b"))]

    async def collect(prompt, adapter_id):
        return [e async for e in served.generate_async(prompt, GREEDY, adapter=adapter_id)]

    async def cancel_after_first():
        params = SamplingParams(temperature=0, max_new_tokens=1000, ignore_eos=True)
        got = asyncio.Event()

        async def consume():
            async for _ in served.generate_async("nora", params):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        a, b, _ = await asyncio.gather(collect("Hello", "a"), collect("xyz", "b"),
                                       cancel_after_first())
        return a, b

    a, b = asyncio.run(main())
    assert [t for e in a for t in e.token_ids] == solo[0].tokens
    assert [t for e in b for t in e.token_ids] == solo[1].tokens
    wait_idle(served)


def test_generate_async_hands_events_over_once_per_step(served):
    """Eight streams on one asyncio loop: the engine wakes the loop once per step (one
    call_soon_threadsafe with the step's events), not once per token per request, and each
    stream still gets its own tokens in order."""
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    prompts = [f"p{i} hello" for i in range(8)]
    solo = [alone(served, p, params).tokens for p in prompts]
    wait_idle(served)

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args, **kw):
            calls.append(callback)
            return real(callback, *args, **kw)

        loop.call_soon_threadsafe = counting

        async def collect(prompt):
            return [t async for e in served.generate_async(prompt, params)
                    for t in e.token_ids]

        steps = served.stats().steps
        outs = await asyncio.gather(*(collect(p) for p in prompts))
        return outs, len(calls), served.stats().steps - steps

    outs, wakeups, steps = asyncio.run(main())
    assert outs == solo
    assert wakeups <= steps + 1 < 8 * 12
    assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks


def test_a_slow_consumer_gets_coalesced_events(served):
    """With coalesce=True, events that queued while the consumer slept arrive as one: fewer
    events, the same tokens, text, logprobs and top logprobs (one per token), the finish on
    the last; without it, one event per token."""
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=True,
                            top_logprobs=2)

    async def collect(coalesce: bool) -> list:
        out = []
        async for e in served.generate_async("Hello", params, coalesce=coalesce):
            out.append(e)
            await asyncio.sleep(0.05 if coalesce else 0)  # the engine runs ahead meanwhile
        return out

    plain, joined = asyncio.run(collect(False)), asyncio.run(collect(True))
    assert len(plain) == 12 and len(joined) < len(plain)
    for field in ("token_ids", "logprobs", "top_logprobs"):
        want = [x for e in plain for x in getattr(e, field)]
        assert [x for e in joined for x in getattr(e, field)] == want, field
    assert "".join(e.text for e in joined) == "".join(e.text for e in plain)
    assert [e.finish_reason for e in joined] == [None] * (len(joined) - 1) + ["length"]
    assert joined[0].queue_seconds is not None and joined[-1].num_output_tokens == 12
    wait_idle(served)


def test_events_report_usage_and_queue_time(served):
    res = alone(served, "Hello", SamplingParams(temperature=0, max_new_tokens=5,
                                                ignore_eos=True))
    n_prompt = len(served.tokenizer.encode("Hello"))
    assert [e.num_output_tokens for e in res.events] == [1, 2, 3, 4, 5]
    assert all(e.num_prompt_tokens == n_prompt for e in res.events)
    assert res.events[0].queue_seconds is not None and res.events[0].queue_seconds >= 0
    assert all(e.queue_seconds is None for e in res.events[1:])


def test_submit_from_many_threads(served):
    """Concurrent submitters: each gets exactly its own events, equal to the request alone."""
    solo = {p: alone(served, p, GREEDY, "b").tokens for p in PROMPTS}
    out: dict[str, list[int]] = {}

    def worker(p):
        out[p] = [t for e in served.generate(p, GREEDY, adapter="b") for t in e.token_ids]

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert out == solo


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_engine_batched_equals_alone(checkpoint):
    """On a GPU: Triton kernels, paged decode attention and CUDA graphs (decode batches replay
    graphs padded to a bucket size; adapters were loaded after capture)."""
    e = make_engine(checkpoint, device="cuda", dtype="float32", max_num_seqs=16,
                    max_model_len=256, kv_memory_fraction=0.05)
    try:
        assert e.runner.graphs
        e.load_adapter("a", adapter(e, 1))
        e.load_adapter("b", adapter(e, 2))
        e.start()
        reqs = mixed_requests()
        solo = [alone(e, *r) for r in reqs]
        batched = run(e, reqs)
        for s, b in zip(solo, batched, strict=True):
            assert b.tokens == s.tokens and b.reason == s.reason
        assert len({alone(e, PROMPTS[0], GREEDY, a).text for a in (None, "a", "b")}) == 3
    finally:
        e.shutdown()


def test_a_dead_loop_fails_its_requests_and_refuses_new_ones(checkpoint, monkeypatch):
    """A bug outside a step (here: the scheduler raising) must not leave requests hanging."""
    e = make_engine(checkpoint)
    try:
        def broken():
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(e.scheduler, "schedule", broken)
        res = alone(e, "Hello", GREEDY)
        assert res.reason == "error" and "scheduler bug" in res.events[-1].error
        assert not e.alive and "scheduler bug" in e.error
        with pytest.raises(RuntimeError, match="scheduler bug"):
            e.submit("Hello", GREEDY, on_event=print)
    finally:
        e.shutdown()


def test_request_ids_are_scoped_per_tenant(served):
    """Issue 10 finding 11: reusing another tenant's in-flight request id made one of the two
    fail. Now ids are unique per tenant: both run, and each tenant's abort reaches only its own
    request."""
    long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    a = served.generate("Hello", long, request_id="job-1", tenant="alice")
    b = served.generate("Hello", long, request_id="job-1", tenant="bob")
    assert next(a).request_id == "job-1" and next(b).request_id == "job-1"
    with pytest.raises(ValueError, match="already in flight"):
        served.submit("Hello", GREEDY, request_id="job-1", tenant="alice", on_event=print)
    served.abort("job-1", tenant="bob")
    assert [e.finish_reason for e in b][-1] == "abort"
    second = next(a)  # alice's request runs on
    assert second.finish_reason is None and len(second.token_ids) == 1
    a.close()


def test_fairness_guard_shares_seats_between_tenants_not_adapters(checkpoint):
    """Issue 10: the fairness unit was the adapter id, so one caller could take every seat
    by spreading a burst over many adapters (or share the base with everyone). With two
    seats and tenant_share 0.5, bob's request takes the seat that frees next, ahead of
    alice's burst, although it uses the same (base) model as all of hers."""
    e = make_engine(checkpoint, max_num_seqs=2, tenant_share=0.5)
    order: list[str] = []
    done = threading.Event()
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)

    def submit(rid: str, tenant: str) -> None:
        def on_event(ev: TokenEvent) -> None:
            if len(ev.token_ids) and ev.num_output_tokens == 1:
                order.append(rid)  # first token: admitted
            if ev.finish_reason and len(order) == 7:
                done.set()
        e.submit("Hello", params, request_id=rid, tenant=tenant, on_event=on_event)

    try:
        for i in range(6):
            submit(f"a{i}", "alice")
        submit("b0", "bob")
        e.start()
        assert done.wait(TIMEOUT)
        assert order.index("b0") <= 2, order  # alice holds her one seat, bob gets the other
    finally:
        e.shutdown()


def test_consecutive_failed_steps_stop_the_engine(checkpoint, monkeypatch):
    """Issue 10: repeated step failures (a CUDA error, say) never marked the engine unhealthy.
    One failed step fails its requests only; max_consecutive_step_failures in a row stop the
    engine (alive False, so health turns NOT_SERVING and nora-serve exits non-zero)."""
    e = make_engine(checkpoint, max_consecutive_step_failures=2).start()
    real_forward = e.runner.forward
    fail_next = [1]

    def flaky(batch):
        if fail_next[0]:
            fail_next[0] -= 1
            raise RuntimeError("device error")
        return real_forward(batch)

    try:
        monkeypatch.setattr(e.runner, "forward", flaky)
        assert alone(e, "Hello", GREEDY).reason == "error"
        assert e.alive and alone(e, "Hello", GREEDY).reason in ("length", "eos")
        fail_next[0] = 2
        assert alone(e, "Hello", GREEDY).reason == "error"
        assert alone(e, "Hello", GREEDY).reason == "error"
        end = time.monotonic() + TIMEOUT  # the loop stops right after the failed step's events
        while e.alive and time.monotonic() < end:
            time.sleep(0.01)
        assert not e.alive and "2 steps in a row failed" in e.error
        with pytest.raises(RuntimeError):
            e.submit("Hello", GREEDY, on_event=print)
    finally:
        e.shutdown()
