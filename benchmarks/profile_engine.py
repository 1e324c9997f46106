"""Where the engine's closed loop spends its time: schedule, prepare, forward (prompt steps and
decode steps apart), sample, the last step's deferred text and events, waiting for the tokens,
postprocess, the per-row finish checks, the rest of a step, and the loop thread's time outside
steps; and of the host's per-token work, detokenize + stop strings and event delivery.

    python benchmarks/profile_engine.py                          # tiny model, CPU
    python benchmarks/profile_engine.py --model 8b-dummy --device cuda --requests 256 \
        --out profile-engine-h200

N requests x (P prompt + O new tokens, random ids, greedy, ignore_eos) go in at once through
`Engine.generate_async` (what the gRPC service uses), consumed by one asyncio loop, after a
warm-up run. The phases are timed by wrapping the engine's own calls on its loop thread with
time.perf_counter (no change to the engine; the wrappers cost ~1 us a call). On a GPU, forward
and sample only queue kernels, the previous step's text work runs while the device computes
(deferred_text_and_events), and what is left of the device's time shows as wait_tokens: read
forward + sample + deferred + wait together. On the CPU the numbers are the host's share with
a model whose forward is tiny (nothing overlaps there): not H200 numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# disjoint phases of the loop thread's time (they add up to the wall time)
PHASES = ("schedule", "prepare", "forward_prompt_steps", "forward_decode_steps", "sample",
          "deferred_text_and_events", "wait_tokens", "postprocess", "emit_finish_checks",
          "step_rest_tolist_bookkeeping", "loop_outside_steps")
# parts of emit_finish_checks (rows with stop strings or a grammar) and deferred_text_and_events
PARTS = ("detokenize_and_stops", "deliver_events")


class Profiler:
    def __init__(self, engine) -> None:
        import nora_runtime.detokenize as detok_mod
        import nora_runtime.engine as engine_mod

        self.t: collections.Counter[str] = collections.Counter()
        self.n: collections.Counter[str] = collections.Counter()
        self.enabled = False
        e, r, s = engine, engine.runner, engine.scheduler
        prompt_step, in_step = [False], [False]

        def timed(name, fn):
            def wrapper(*args, **kw):
                if not self.enabled:
                    return fn(*args, **kw)
                t = time.perf_counter()
                out = fn(*args, **kw)
                key = name() if callable(name) else name
                self.t[key] += time.perf_counter() - t
                self.n[key] += 1
                return out
            return wrapper

        s.schedule = timed("schedule", s.schedule)
        r.prepare = timed("prepare", r.prepare)
        r.forward = timed(lambda: "forward_prompt_steps" if prompt_step[0]
                          else "forward_decode_steps", r.forward)
        s.postprocess = timed("postprocess", s.postprocess)
        e._deliver = timed("deliver_events", e._deliver)
        e._emit = timed("emit", e._emit)
        # the drain also runs between steps (before the loop waits, aborts, deadlines)
        e._drain = timed(lambda: "deferred_text_and_events" if in_step[0]
                         else "deferred_outside_steps", e._drain)
        engine_mod.sample = timed("sample", engine_mod.sample)
        copy = engine_mod.HostCopy
        engine_mod.HostCopy = timed("sample", copy)  # queues the copies to the host
        copy.wait = timed("wait_tokens", copy.wait)
        inc, stops = detok_mod.IncrementalDetokenizer, detok_mod.StopChecker
        for cls, meth in ((inc, "step"), (inc, "flush"), (stops, "feed"), (stops, "flush")):
            setattr(cls, meth, timed("detokenize_and_stops", getattr(cls, meth)))
        step = timed("step", e._step)

        def step_wrapper(batch):
            prompt_step[0] = any(n > 1 for n in batch.num_new_tokens)
            self.n["prompt_steps" if prompt_step[0] else "decode_steps"] += self.enabled
            in_step[0] = True
            try:
                return step(batch)
            finally:
                in_step[0] = False

        e._step = step_wrapper

    def result(self, wall: float) -> dict:
        t = dict(self.t)
        step = t.pop("step", 0.0)
        outside = t.pop("deferred_outside_steps", 0.0)
        t["deferred_text_and_events"] = t.get("deferred_text_and_events", 0.0) + outside
        # _emit's own time: the finish checks, freeing, and the text work of rows with stop
        # strings or a grammar (detokenize_and_stops and deliver_events are parts of it)
        t["emit_finish_checks"] = t.pop("emit", 0.0)
        inner = sum(t.get(k, 0.0) for k in ("prepare", "forward_prompt_steps",
                                            "forward_decode_steps", "sample", "wait_tokens",
                                            "postprocess", "emit_finish_checks"))
        t["step_rest_tolist_bookkeeping"] = max(
            0.0, step - inner - (t["deferred_text_and_events"] - outside))
        t["loop_outside_steps"] = max(0.0, wall - step - t.get("schedule", 0.0) - outside)
        keys = PHASES + PARTS
        return {"wall_s": wall, "seconds": {k: t.get(k, 0.0) for k in keys},
                "share": {k: t.get(k, 0.0) / wall for k in keys},
                "calls": dict(self.n)}


async def closed_loop(engine, prompts, params) -> tuple[float, int]:
    async def one(p) -> int:
        n = 0
        async for ev in engine.generate_async(p, params):
            n += len(ev.token_ids)
            if ev.finish_reason and ev.finish_reason != "length":
                raise RuntimeError(f"request ended with {ev.finish_reason}: {ev.error}")
        return n

    t = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t, sum(counts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir or 8b-dummy (default: tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="profile-engine-cpu")
    a = p.parse_args(argv)

    from nora_runtime.config import EngineConfig
    from nora_runtime.engine import Engine
    from nora_runtime.sampling import SamplingParams

    tmp = tempfile.TemporaryDirectory()
    fmt = "auto"
    if a.model == "8b-dummy":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_engine import model_config

        from nora_runtime.tiny import byte_tokenizer
        cfg = model_config(small=False)
        cfg.save_pretrained(tmp.name)
        byte_tokenizer(cfg.vocab_size).save_pretrained(tmp.name)
        model, fmt = tmp.name, "dummy"
    elif a.model is None:
        from nora_runtime.tiny import tiny_checkpoint
        model = str(tiny_checkpoint())
    else:
        model = a.model
    cfg = EngineConfig(model=model, device=a.device, load_format=fmt, max_num_seqs=256,
                       max_num_batched_tokens=8192, max_model_len=a.prompt_len + a.new_tokens + 64,
                       kv_cache_tokens_cpu=max(65536, a.requests * (a.prompt_len + a.new_tokens
                                                                    + 32)),
                       kv_memory_fraction=0.5)
    engine = Engine(cfg).start()
    cuda = engine.runner.device.type == "cuda"
    prof = Profiler(engine)
    rng = random.Random(0)
    vocab = min(engine.info.vocab_size, 256)
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt_len)] for _ in range(a.requests)]
    params = SamplingParams(temperature=0, max_new_tokens=a.new_tokens, ignore_eos=True)
    asyncio.run(closed_loop(engine, prompts, params))  # warm-up
    plain = [asyncio.run(closed_loop(engine, prompts, params))[0] for _ in range(a.repeats)]
    prof.enabled = True
    profiled = []
    for _ in range(a.repeats):
        prof.t.clear()
        prof.n.clear()
        wall, tokens = asyncio.run(closed_loop(engine, prompts, params))
        profiled.append((wall, prof.result(wall)))
    engine.shutdown()
    wall, res = sorted(profiled, key=lambda x: x[0])[len(profiled) // 2]
    plain_wall = sorted(plain)[len(plain) // 2]

    import transformers
    dev = torch.cuda.get_device_name() if cuda else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    doc = {"device": dev, "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": " ".join(["python", "benchmarks/profile_engine.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "model": a.model or "tiny test model (nora_runtime.tiny)",
        "workload": {"requests": a.requests, "prompt_len": a.prompt_len,
                     "new_tokens": a.new_tokens, "repeats": a.repeats},
        "throughput_tok_s_unprofiled": a.requests * a.new_tokens / plain_wall,
        "throughput_tok_s_profiled": a.requests * a.new_tokens / wall,
        "profile": res,
        "host_ms_per_step": {k: res["seconds"][k] / max(1, res["calls"].get("prompt_steps", 0)
                                                      + res["calls"].get("decode_steps", 0)) * 1e3
                             for k in PHASES + PARTS if not k.startswith("forward")}}
    out = RESULTS / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    calls = res["calls"]
    lines = [f"# Engine closed-loop profile ({a.out})", "",
             f"{doc['date']}, {dev}, torch {torch.__version__}, model {doc['model']}. "
             f"Command: `{doc['command']}`.", "",
             f"{a.requests} requests x ({a.prompt_len} prompt + {a.new_tokens} new tokens) at "
             f"once through Engine.generate_async, one asyncio consumer; median of "
             f"{a.repeats} runs. Throughput {doc['throughput_tok_s_unprofiled']:,.0f} tok/s "
             f"unprofiled, {doc['throughput_tok_s_profiled']:,.0f} profiled; "
             f"{calls.get('prompt_steps', 0)} steps with prompt tokens, "
             f"{calls.get('decode_steps', 0)} decode-only steps.", "",
             "| phase (engine loop thread) | seconds | share of wall | ms per step |",
             "|---|---|---|---|"]
    steps = max(1, calls.get("prompt_steps", 0) + calls.get("decode_steps", 0))
    for k in PHASES:
        lines.append(f"| {k} | {res['seconds'][k]:.3f} | {res['share'][k]:.1%} | "
                     f"{res['seconds'][k] / steps * 1e3:.2f} |")
    lines.append(f"| wall | {res['wall_s']:.3f} | 100% | {res['wall_s'] / steps * 1e3:.2f} |")
    for k in PARTS:
        lines.append(f"| (part) {k} | {res['seconds'][k]:.3f} | {res['share'][k]:.1%} | "
                     f"{res['seconds'][k] / steps * 1e3:.2f} |")
    lines += ["",
              "forward_*: ModelRunner.forward; sample: sampling and queuing the tokens' copy "
              "to the host (HostCopy); deferred_text_and_events: Engine._drain, the previous "
              "step's text and events of rows without stop strings or a grammar (run while "
              "the device computes the step on GPU; also between steps, before the loop "
              "waits); wait_tokens: HostCopy.wait, the device time the drain did not cover; "
              "emit_finish_checks: Engine._emit, finish checks and freeing, and the whole "
              "text work of rows with stop strings or a grammar; step_rest: .tolist, "
              "per-step bookkeeping in Engine._step and handing the drained events to asyncio "
              "(_flush_events: one call_soon_threadsafe per asyncio loop); loop_outside_steps: "
              "the loop thread between steps (the outbox of events sent at once, locks, "
              "waiting, the GIL held by the asyncio consumer). Parts of emit_finish_checks "
              "and deferred_text_and_events: detokenize_and_stops (IncrementalDetokenizer + "
              "StopChecker) and deliver_events (the request callbacks; generate_async: an "
              "append to the step's outbox)."]
    if not cuda:
        lines += ["", "CPU, tiny model: the host work's share, not H200 numbers (the forward "
                  "of an 8B model on the H200 is ~10-20 ms a step; here it is the tiny model's "
                  "CPU forward)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
