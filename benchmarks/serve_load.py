"""The load side of bench_serve.py: requests of a workload (fixed or mixed lengths, an adapter
set), the streaming asyncio clients that send them closed-loop or at a Poisson rate (from this
process or several client processes), and the per-run summary (tok/s, TTFT / ITL / E2E
percentiles, the client's and the server's CPU-seconds per second)."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench_serve import Server

MIXED_PROMPT = (32, 2048)
MIXED_OUTPUT = (16, 512)


# ---- workload --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new: int
    adapter: str | None


@dataclasses.dataclass
class Result:
    ok: bool
    error: str = ""
    ttft: float = 0.0  # s, send -> first token
    itl: list[float] = dataclasses.field(default_factory=list)  # s, between token messages
    e2e: float = 0.0
    out_tokens: int = 0


def adapter_picker(spec: str, rng: random.Random):
    """A function () -> adapter id for an adapter set: none, 1, uK, zK."""
    if spec == "none":
        return lambda: None
    if spec == "1":
        return lambda: "a0"
    kind, k = spec[0], int(spec[1:])
    if kind == "u":
        return lambda: f"a{rng.randrange(k)}"
    if kind == "z":  # Zipf alpha = 1: P(rank i) ~ 1 / (i + 1)
        cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(k)))
        return lambda: f"a{min(bisect.bisect_left(cum, rng.random() * cum[-1]), k - 1)}"
    raise ValueError(f"adapter set must be none, 1, uK or zK, got {spec!r}")


def adapter_count(spec: str) -> int:
    return 0 if spec == "none" else 1 if spec == "1" else int(spec[1:])


def make_requests(workload: str, n: int, prompt_len: int, new_tokens: int, vocab: int,
                  adapters: str, seed: int, mixed_prompt: tuple[int, int] = MIXED_PROMPT,
                  mixed_output: tuple[int, int] = MIXED_OUTPUT) -> list[Request]:
    rng = random.Random(seed)
    pick = adapter_picker(adapters, random.Random(seed + 1))
    out = []
    for _ in range(n):
        if workload == "fixed":
            p, o = prompt_len, new_tokens
        elif workload == "mixed":
            p, o = rng.randint(*mixed_prompt), rng.randint(*mixed_output)
        else:
            raise ValueError(f"workload must be fixed or mixed, got {workload!r}")
        out.append(Request([rng.randrange(vocab) for _ in range(p)], o, pick()))
    return out


# ---- clients ---------------------------------------------------------------------------------


async def one(client, req: Request) -> Result:
    import grpc

    t0 = time.perf_counter()
    last = None
    res = Result(ok=False)
    try:
        async for part in client.generate_stream(
                req.prompt, adapter_id=req.adapter, temperature=0, max_new_tokens=req.max_new,
                ignore_eos=True):
            n = len(part.token_ids)
            if n:
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.extend([(now - last) / n] * n)
                last = now
                res.out_tokens += n
            if part.finish_reason and part.error:
                res.error = part.error
    except grpc.RpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    res.e2e = time.perf_counter() - t0
    res.ok = not res.error and res.out_tokens == req.max_new
    if not res.ok and not res.error:
        res.error = f"{res.out_tokens} of {req.max_new} tokens"
    return res


async def run_load(target: str, reqs: list[Request], rate: str, concurrency: int,
                   seed: int, channels: int, barrier=None) -> tuple[list[Result], float, float]:
    """Send `reqs` closed-loop (`concurrency` in flight) or Poisson (`rate` requests/s); the
    results and time.monotonic() at the first send and after the last answer. `barrier` (a
    multiprocessing.Barrier): wait on it, connected, before the first send."""
    from nora_client import AsyncNoraClient

    clients = [AsyncNoraClient(target, timeout=3600, retries=0) for _ in range(channels)]
    try:
        for c in clients:
            await c.channel.channel_ready()
        if barrier is not None:
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        results: list[Result | None] = [None] * len(reqs)
        t0 = time.monotonic()
        if rate == "closed":
            nxt = iter(range(len(reqs)))

            async def worker(w: int) -> None:
                for i in nxt:
                    results[i] = await one(clients[w % channels], reqs[i])

            await asyncio.gather(*(worker(w) for w in range(min(concurrency, len(reqs)))))
        else:
            lam, rng = float(rate), random.Random(seed + 2)
            tasks, at = [], 0.0

            async def send(i: int) -> None:
                results[i] = await one(clients[i % channels], reqs[i])

            for i in range(len(reqs)):
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(send(i)))
                at += rng.expovariate(lam)
            await asyncio.gather(*tasks)
        return results, t0, time.monotonic()
    finally:
        for c in clients:
            await c.close()


_barrier = None  # a client process's start barrier (Load._in_procs)


def _set_barrier(barrier) -> None:
    global _barrier
    _barrier = barrier


def _proc_load(*args) -> tuple[list[Result], float, float, float]:
    """One client process's share of a load: run_load's answer and its own CPU seconds."""
    cpu = time.process_time()
    results, t0, t1 = asyncio.run(run_load(*args, barrier=_barrier))
    return results, t0, t1, time.process_time() - cpu


class Load:
    """Runs loads from this process (procs = 1, on `loop`) or from `procs` client processes,
    each sending every procs-th request with its share of the concurrency and channels, all
    starting together. Measures the clients' and the server's CPU time: a client process near
    one CPU-second per second limits the rate it can take tokens at, not the server. (With
    client processes the server's count also covers their start, when it idles: a little
    high.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, procs: int, server: Server) -> None:
        self.loop, self.procs, self.server = loop, procs, server

    def __call__(self, reqs: list[Request], rate: str, concurrency: int, seed: int,
                 channels: int) -> tuple[list[Result], float, dict]:
        server_cpu = self.server.cpu_seconds()
        if self.procs == 1:
            cpu = time.process_time()
            results, t0, t1 = self.loop.run_until_complete(
                run_load(self.server.target, reqs, rate, concurrency, seed, channels))
            cpus = [time.process_time() - cpu]
        else:
            results, t0, t1, cpus = self._in_procs(reqs, rate, concurrency, seed, channels)
        wall = t1 - t0
        server_cpu = self.server.cpu_seconds() - server_cpu
        usage = {"client_cpu_share_max": round(max(cpus) / wall, 3),
                 "server_cpu_s_per_s": round(server_cpu / wall, 3)}
        return results, wall, usage

    def _in_procs(self, reqs, rate, concurrency, seed, channels):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        n = self.procs
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_set_barrier,
                                 initargs=(ctx.Barrier(n),)) as pool:
            futures = [pool.submit(_proc_load, self.server.target, reqs[k::n],
                                   rate if rate == "closed" else str(float(rate) / n),
                                   max(1, concurrency // n), seed + k, max(1, channels // n))
                       for k in range(n)]
            outs = [f.result() for f in futures]
        results: list[Result] = [None] * len(reqs)  # type: ignore[list-item]
        for k, (part, _, _, _) in enumerate(outs):
            results[k::n] = part
        return (results, min(o[1] for o in outs), max(o[2] for o in outs),
                [o[3] for o in outs])


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1e3


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl]
    return {"wall_s": round(wall, 3), "requests_ok": len(ok),
            "requests_failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:5],
            "output_tokens": sum(r.out_tokens for r in results),
            "output_tok_s": sum(r.out_tokens for r in results) / wall,
            "request_s": len(ok) / wall,
            "ttft_p50_ms": pct([r.ttft for r in ok], 50),
            "ttft_p99_ms": pct([r.ttft for r in ok], 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "e2e_p50_ms": pct([r.e2e for r in ok], 50),
            "e2e_p99_ms": pct([r.e2e for r in ok], 99)}


async def model_info(target: str):
    from nora_client import AsyncNoraClient

    async with AsyncNoraClient(target, timeout=60) as c:
        return await c.model_info()
