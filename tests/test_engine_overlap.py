"""The engine defers a step's per-token text work (detokenizing, building and delivering
events) to the next step's device time, for requests whose finish cannot depend on text
(issue 11, point 4). Nothing a request receives may change: a batch mixing deferred rows with
rows done at once (stop strings, a grammar), logprobs, an abort mid-stream and several
requests ending by length, EOS and stop ids in the same step gives each request exactly the
events it gets alone; the last events arrive before the engine idles; an abort comes after the
request's pending tokens, and one sent on seeing a token ends the request before the next
token's event. And the deferral is real: a plain request's event of step k comes after step
k+1's forward, a request with stop strings gets it before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue

import pytest

from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.sampling import SamplingParams
from nora_runtime.structured import StructuredOutput
from nora_runtime.tiny import tiny_checkpoint

TIMEOUT = 60


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", max_num_seqs=32,
                            kv_cache_tokens_cpu=8192)).start()
    yield e
    e.shutdown()


def run(engine: Engine, requests: list[tuple[str, SamplingParams]],
        abort_at: dict[int, tuple[int, int]] | None = None) -> list[list[TokenEvent]]:
    """Submit (prompt, params) requests together and collect each one's events until its
    last. abort_at {i: (j, n)}: request j's callback aborts request i when j's n-th event comes
    (on the loop thread, so at a known point of a known step)."""
    abort_at = abort_at or {}
    results: list[list[TokenEvent]] = [[] for _ in requests]
    events: queue.SimpleQueue[tuple[int, TokenEvent]] = queue.SimpleQueue()

    def on_event(j: int, event: TokenEvent) -> None:
        events.put((j, event))
        results[j].append(event)
        for i, at in abort_at.items():
            if at == (j, len(results[j])):
                engine.abort(f"overlap-{i}")

    # under the loop's lock (a reentrant Condition), so that the loop takes them all at once:
    # otherwise, on a busy machine, it may run a step with the first before the others come
    # and the steps of the tests' reasoning shift
    with engine._lock:
        for i, (prompt, params) in enumerate(requests):
            engine.submit(prompt, params, request_id=f"overlap-{i}",
                          on_event=lambda e, i=i: on_event(i, e))
    pending = len(requests)
    while pending:
        _, event = events.get(timeout=TIMEOUT)
        pending -= event.finish_reason is not None
    return results


def content(events: list[TokenEvent]) -> list[tuple]:
    """What a request receives, but the queue time's value (timing) and logprobs (compared up
    to the model's float differences between batch shapes)."""
    return [(e.token_ids, e.text, e.finish_reason, e.error, e.num_prompt_tokens,
             e.num_output_tokens, e.queue_seconds is not None, e.logprobs is not None,
             None if e.top_logprobs is None else [[t for t, _ in top] for top in e.top_logprobs])
            for e in events]


def logprobs(events: list[TokenEvent]) -> list[float]:
    return [lp for e in events for lp in (e.logprobs or ())] + [
        lp for e in events for top in (e.top_logprobs or ()) for _, lp in top]


REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
MIXED = [
    # deferred rows; 0, 1 and 4 end in the same step (prompts of one length): length, EOS
    # (this seed's 8th token is EOS), length
    ("Hello", SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)),
    ("Hi", SamplingParams(temperature=1.5, seed=10, max_new_tokens=40)),
    ("Hello", SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(54,))),
    ("abc", SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)),  # aborted
    ("Hi", SamplingParams(temperature=1.0, seed=3, max_new_tokens=8, logprobs=True,
                          top_logprobs=3)),
    # rows done at once: stop strings (one matching, one not), a grammar
    ("Hello", SamplingParams(temperature=0, max_new_tokens=12, stop=("WW",))),
    ("Hi", SamplingParams(temperature=1.5, seed=4, max_new_tokens=30, stop=("\x00\x00",),
                          logprobs=True, top_logprobs=2)),
    ("Code:", SamplingParams(temperature=0.9, seed=4, max_new_tokens=20,
                             structured=StructuredOutput("regex", REGEX))),
]
ABORTED, ABORT_AT = 3, 3


def test_mixed_batch_gives_each_request_its_events_alone(engine):
    solo = [run(engine, [r])[0] for r in MIXED]
    reasons = [s[-1].finish_reason for s in solo]
    assert reasons[:3] == ["length", "eos", "stop"] and reasons[5] == "stop", reasons
    assert len(solo[0]) == len(solo[1]) == len(solo[4]) == 8  # they end in the same step
    for order in (list(range(len(MIXED))), list(range(len(MIXED)))[::-1]):
        aborted = order.index(ABORTED)
        batched = run(engine, [MIXED[i] for i in order],
                      abort_at={aborted: (aborted, ABORT_AT)})
        for j, i in enumerate(order):
            got, want = batched[j], solo[i]
            if i == ABORTED:
                # aborted on its 3rd event, which comes during step 4: step 4's token is
                # dropped, the abort event right after the 3rd
                *got, end = got
                assert end.finish_reason == "abort" and end.token_ids == ()
                assert end.num_output_tokens == len(got) == ABORT_AT
                want = want[:len(got)]
            assert content(got) == content(want), f"request {i}"
            assert logprobs(got) == pytest.approx(logprobs(want), abs=1e-4)
    assert engine._pending == []
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks


def test_a_lone_request_gets_its_last_event_before_the_engine_idles(engine):
    params = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    events = run(engine, [("Hello", params)])[0]  # fails on a timeout if the end is stuck
    assert [e.num_output_tokens for e in events] == [1, 2, 3, 4, 5]
    assert events[-1].finish_reason == "length" and engine._pending == []

    async def stream() -> list[TokenEvent]:  # through the asyncio outbox too
        return [e async for e in engine.generate_async("Hello", params)]

    events = asyncio.run(asyncio.wait_for(stream(), TIMEOUT))
    assert [e.num_output_tokens for e in events] == [1, 2, 3, 4, 5]
    assert events[-1].finish_reason == "length"


def test_pending_tokens_come_before_the_abort_event(engine):
    """Request 0 is aborted by request 1's callback on its 2nd event, which (stop strings: no
    deferral) comes at the end of step 2, after request 0's 2nd token was taken: the abort
    ends it at the step boundary, when that token's text and event are still pending. They
    come first."""
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    solo = run(engine, [("abc", params)])[0]
    events = run(engine, [("abc", params), ("Hello", dataclasses.replace(params, stop=("zzz",)))],
                 abort_at={0: (1, 2)})[0]
    assert [e.finish_reason for e in events] == [None, None, "abort"]
    assert content(events[:2]) == content(solo[:2])
    assert events[-1].num_output_tokens == 2


def test_an_abort_on_seeing_a_token_ends_the_request_before_the_next_event(engine):
    """A caller sees step k's token during step k+1 (the drain): its abort then ends the
    request before step k+1's token is taken, not one step later."""
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    events = run(engine, [("abc", params)], abort_at={0: (0, 1)})[0]
    assert [e.finish_reason for e in events] == [None, "abort"]
    assert events[-1].num_output_tokens == 1
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks


def test_text_work_of_a_step_runs_during_the_next_forward(engine, monkeypatch):
    """F: a forward pass, E<n>: the event of a request's n-th token. A plain request's event
    of step k comes after step k+1's forward began (its text was deferred); one with stop
    strings gets it at once."""
    marks: list[str] = []
    forward = engine.runner.forward

    def marking(batch):
        marks.append("F")
        return forward(batch)

    done: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()

    def on_event(event: TokenEvent) -> None:  # on the loop thread, as forward is
        marks.append(f"E{event.num_output_tokens}")
        if event.finish_reason:
            done.put(event)

    monkeypatch.setattr(engine.runner, "forward", marking)
    for stop, want in (((), "F F E1 F E2 F E3 E4"), (("zzz",), "F E1 F E2 F E3 F E4")):
        marks.clear()
        params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, stop=stop)
        engine.submit("Hello", params, on_event=on_event)
        assert done.get(timeout=TIMEOUT).finish_reason == "length"
        assert " ".join(marks) == want


@pytest.mark.parametrize("max_new_tokens", [3, 10])
def test_a_failing_deferred_text_ends_its_request_only(engine, monkeypatch, max_new_tokens):
    """The detokenizer raising on a request's 3rd token (deferred text work): that request ends
    with "error" (at once when the token was its last, else at its next token), its events up
    to there intact; another request in the same steps is not disturbed."""
    import nora_runtime.engine as engine_mod

    class Broken(engine_mod.IncrementalDetokenizer):
        steps = 0

        def step(self, token_id: int) -> str:
            self.steps += 1
            if self.steps == 3:
                raise RuntimeError("detokenizer bug")
            return super().step(token_id)

    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    other = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    solo = run(engine, [("Hello", params)])[0]
    other_solo = run(engine, [("abc", other)])[0]
    monkeypatch.setattr(engine_mod, "IncrementalDetokenizer", Broken)
    events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
    engine.submit("Hello", params, on_event=events.put)
    monkeypatch.undo()
    got_other = run(engine, [("abc", other)])[0]
    got = [events.get(timeout=TIMEOUT) for _ in range(3)]
    assert content(got[:2]) == content(solo[:2])
    end = got[2]
    assert end.finish_reason == "error" and "detokenizer bug" in end.error
    assert end.num_output_tokens == (3 if max_new_tokens == 3 else 4)
    assert content(got_other) == content(other_solo)
    assert engine._pending == [] and engine.stats().num_running == 0
