"""Named adapters evicted to the store are reloaded once for all the requests that want them at
the same moment, and such requests are never refused for busy adapter workers (the H200
serving benchmark's LoRA run on 1,000 Zipf-popular adapters got RESOURCE_EXHAUSTED for a
quarter of its requests when every request queued its own reload). A real server on
127.0.0.1 serving the tiny test model on CPU."""

from __future__ import annotations

import asyncio

from test_server import PROMPT, ServerThread

from nora_runtime.adapter import save_adapter
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.tiny import random_adapter, tiny_checkpoint

REQUESTS = 200  # more than the adapter workers' bound for inline loads (4 threads + 64 queued)


def test_concurrent_requests_share_one_reload_per_evicted_adapter(tmp_path):
    engine = Engine(EngineConfig(model=str(tiny_checkpoint()), device="cpu", mode="replace",
                                 max_adapters=4, max_num_seqs=32), adapter_store=tmp_path)
    engine.start()
    s = None
    try:
        for i, name in enumerate("abcdef"):  # 6 named adapters, 4 slots: a and b evicted
            save_adapter(random_adapter(engine.info, i + 1), tmp_path / f"{name}.safetensors",
                         base_fingerprint=engine.info.fingerprint)
            engine.load_adapter(name, f"{name}.safetensors")
        assert not engine.registry.get("a").resident and not engine.registry.get("b").resident
        reloads = engine.stats().adapter_reloads
        s = ServerThread(engine, max_concurrent_requests=4 * REQUESTS)

        # token ids, not text: 200 texts at once would overflow the tokenizer workers' own
        # bound (2 threads + 64 queued) on a busy machine, which is not what this tests
        ids = engine.tokenizer.encode(PROMPT)

        async def traffic():
            from nora_client import AsyncNoraClient

            async with AsyncNoraClient(s.target, timeout=120, retries=0) as nora:
                return await asyncio.gather(*[
                    nora.generate(ids, adapter_id="ab"[i % 2], max_new_tokens=2,
                                  ignore_eos=True) for i in range(REQUESTS)],
                    return_exceptions=True)

        replies = asyncio.run_coroutine_threadsafe(traffic(), s.loop).result(300)
        errors = [r for r in replies if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} failed, e.g. {errors[0]!r}"
        assert all(len(r.token_ids) == 2 for r in replies)
        assert engine.stats().adapter_reloads - reloads == 2  # one reload per evicted id ...
        # ... asked for once each: the other requests waited for it instead of queueing their
        # own (which the adapter workers' bound refused when the reloads were slow: 13.6 MB
        # LoRAs of an 8B model on the H200; the tiny model's take a millisecond)
        assert s.server.service.reload_pool.calls == 2
    finally:
        if s is not None:
            s.close()
        engine.shutdown()
