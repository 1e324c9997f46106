"""Adapters for bench_serve.py: many distinct NoRA adapter files (made by a pool of processes
when there are many) or PEFT LoRA ones, and LoadAdapter calls that load them into a running
nora-serve, timed."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_ADAPTER: dict = {}  # per process: the NoraAdapter whose B factors each blob redraws
BLOB_CHUNK = 4096  # adapters a pool makes at a time (bounded memory: ~50 MB of 8B-shaped ones)


def nora_blob(spec: tuple) -> bytes:
    """Adapter file i of spec = (act, groups, layers, mode, fingerprint, seed, i): a
    NoraAdapter whose B factors come from a generator seeded by (seed, i), so that any process
    makes the same tensors (~1 ms)."""
    import torch

    from nora_runtime.adapter import NoraAdapter, adapter_to_bytes
    from nora_runtime.rational import base_coefficients

    act, groups, layers, mode, fingerprint, seed, i = spec
    if _ADAPTER.get("key") != (act, groups, layers, mode, seed):
        _ADAPTER["key"] = (act, groups, layers, mode, seed)
        torch.manual_seed(seed)  # the A factors: the same in every process
        _ADAPTER["m"] = NoraAdapter(base_coefficients(act), rank=3, alpha=6.0, groups=groups,
                                    site_names=[f"model.layers.{j}.mlp.act_fn"
                                                for j in range(layers)], act=act, mode=mode)
    m = _ADAPTER["m"]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
    with torch.no_grad():
        for p in (m.num_B, m.den_B):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return adapter_to_bytes(m, base_fingerprint=fingerprint)


def adapter_blobs(info, count: int, seed: int):
    """`count` distinct adapter files (bytes) for the served model `info` (ModelInfoResponse),
    in order. Many are made by a pool of processes, a chunk ahead of the consumer: in this
    process, 100,000 took minutes on the H200 host, during which the LoadAdapter calls waited
    for their bytes."""
    specs = [(info.act, info.groups, info.num_layers, info.mode, info.fingerprint, seed, i)
             for i in range(count)]
    if count < 2 * BLOB_CHUNK:
        yield from map(nora_blob, specs)
        return
    import multiprocessing

    procs = max(1, min(8, (os.cpu_count() or 2) - 2))
    chunks = [specs[s:s + BLOB_CHUNK] for s in range(0, count, BLOB_CHUNK)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        ahead = pool.map_async(nora_blob, chunks[0])
        for k in range(len(chunks)):
            done = ahead.get()
            if k + 1 < len(chunks):
                ahead = pool.map_async(nora_blob, chunks[k + 1])
            yield from done


def lora_blobs(info, count: int, seed: int, rank: int, targets: tuple[str, ...], hf_config):
    """`count` distinct PEFT LoRA adapters (packed, as nora_runtime.lora.pack_peft makes of a
    directory) of rank `rank` on `targets` of every layer: bench_lora's random bf16 factors,
    a new draw for each."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_lora import peft_lora_bytes

    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield peft_lora_bytes(hf_config, seed, rank=rank, targets=targets, generator=gen)


async def load_rpc(target: str, blobs, count: int, in_flight: int = 16) -> list[float]:
    """LoadAdapter a0..a{count-1} from bytes, `in_flight` at a time; each call's seconds."""
    from nora_client import AsyncNoraClient

    times: list[float] = []
    work = enumerate(blobs)  # made as the loads go: 100,000 files need not sit in memory
    async with AsyncNoraClient(target, timeout=600, max_message_bytes=1 << 30) as c:
        async def worker() -> None:
            for i, data in work:
                t = time.perf_counter()
                await c.load_adapter(f"a{i}", data=data)
                times.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    assert len(times) == count
    return times
