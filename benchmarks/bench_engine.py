"""Serving-engine benchmarks on an 8B-shaped Llama with random bf16 weights (the engine issue's
rows), against the byte floor and transformers' own decode on the same shapes.

Run on a CUDA machine from the repo root:
    PYTHONPATH=. python benchmarks/bench_engine.py --out benchmarks/results/engine.json
`--small` runs the same code on a tiny model (CPU works) to check the script itself.

What is timed (medians of many runs after warm-up):
- decode_step_b{B}_ms: one engine decode step at batch B, every sequence at context 512 (random
  KV): prepare (host metadata -> device), forward (CUDA graph replay), greedy sampling, tokens
  back to the host. Host-clocked around a step that ends in a device sync. forward_b{B}_ms is
  the forward alone (device events). floor_b{B}_ms = (weights read once + KV read once) / the
  copy bandwidth measured here.
- hf_static_*_b128_ms: transformers' LlamaForCausalLM decode step with a StaticCache at batch
  128, context 512, eager and torch.compile(mode="reduce-overhead") (../shared/anchors script).
- mixed_vs_base_b128_ratio: the b128 step with 128 sequences on 128 distinct adapters over the
  same step with no adapter (interleaved repeats).
- throughput_tok_s: closed loop, 256 requests (random 128-token prompts, 128 new tokens each,
  greedy, ignore EOS) submitted at once to a started Engine; generated tokens / wall time;
  median of 3 runs after a warm-up.
- prefill_tok_s: 8 prompts of 2,048 tokens, one new token each: prompt tokens / wall time.
  hf_generate_tok_s: transformers' generate on the same 256 prompts in one batch.
- adapter_load_ms_p50/p99: Engine.load_adapter of 8B-shaped adapter files (32 sites, G = 8)
  from bytes, 100,000 ids into a 100,000-slot table, idle engine; *_busy_*: loads while the
  engine serves a decode workload.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaConfig

from nora_runtime.adapter import NoraAdapter, adapter_to_bytes
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.model_runner import ModelRunner
from nora_runtime.rational import base_coefficients
from nora_runtime.sampling import SamplingParams, sample
from nora_runtime.tiny import byte_tokenizer

CTX = 512
THROUGHPUT = (256, 128, 128)  # requests, prompt tokens, new tokens
PREFILL = (8, 2048)  # requests, prompt tokens


def model_config(small: bool) -> LlamaConfig:
    if small:
        return LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False)


def versions() -> dict:
    import transformers
    import triton

    v = {"torch": torch.__version__, "triton": triton.__version__,
         "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name())
    return v


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of fn (which must end in a device sync), ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def device_ms(fn) -> float:
    if not torch.cuda.is_available():
        sync()
        return host_ms(fn, 2, 5)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_tbps() -> float:
    """Device copy bandwidth (bytes read + written), 2 GiB bf16, as the anchors measure it."""
    if not torch.cuda.is_available():
        return float("nan")
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = device_ms(lambda: y.copy_(x))
    return 2 * (1 << 30) * 2 / (ms * 1e-3) / 1e12


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Seq:
    """A sequence at context `ctx` with one pending token (what prepare reads)."""

    def __init__(self, ctx: int, blocks: list[int], slot: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (ctx + 1,)).tolist()
        self.num_computed, self.block_table, self.slot = ctx, blocks, slot

    def token_slice(self, start: int, stop: int) -> list[int]:
        return self.ids[start:stop]


def random_adapter(fingerprint: str, layers: int, seed: int) -> bytes:
    torch.manual_seed(seed)
    m = NoraAdapter(base_coefficients("silu"), rank=3, alpha=6.0, groups=8,
                    site_names=[f"model.layers.{i}.mlp.act_fn" for i in range(layers)],
                    act="silu", mode=EngineConfig.mode)  # the served default (residual)
    with torch.no_grad():
        m.num_B.normal_(0.0, 0.05)
        m.den_B.normal_(0.0, 0.05)
    return adapter_to_bytes(m, base_fingerprint=fingerprint)


# ---- parts ---------------------------------------------------------------------------------


def bench_runner(ckpt: Path, cfg: LlamaConfig, res: dict, small: bool) -> None:
    """Decode steps at B = 1/32/128/256 and the mixed-adapter ratio, on the model runner."""
    ecfg = EngineConfig(model=str(ckpt), load_format="dummy", max_num_seqs=256,
                        max_model_len=CTX + 64, max_num_batched_tokens=8192,
                        kv_memory_fraction=0.3, max_adapters=128, kv_cache_tokens_cpu=300_000)
    t = time.perf_counter()
    runner = ModelRunner(ecfg, ckpt)
    res["runner_init_s"] = time.perf_counter() - t
    runner.k_cache.normal_()
    runner.v_cache.normal_()
    bs = runner.block_size
    per_seq = -(-(CTX + 1) // bs)
    L, nkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    weights = sum(p.numel() for n, p in runner.model.named_parameters()
                  if not n.startswith("embed_tokens")) * 2
    bw = res["copy_tbps"]
    greedy = SamplingParams(temperature=0)

    def seqs_for(B: int, slots: list[int]) -> list[Seq]:
        return [Seq(CTX, list(range(i * per_seq, (i + 1) * per_seq)), slots[i], cfg.vocab_size)
                for i in range(B)]

    def engine_step(seqs: list[Seq]) -> None:
        fb = runner.prepare(seqs, [1] * len(seqs), [True] * len(seqs))
        logits = runner.forward(fb)
        sample(logits, [greedy] * len(seqs), [None] * len(seqs), [()] * len(seqs)).tokens.tolist()

    for B in (1, 32, 128, 256):
        seqs = seqs_for(B, [0] * B)
        kv = B * CTX * L * 2 * nkv * d * 2
        res[f"floor_b{B}_ms"] = (weights + kv) / (bw * 1e12) * 1e3
        res[f"decode_step_b{B}_ms"] = host_ms(lambda s=seqs: engine_step(s), 10, 50)
        fb = runner.prepare(seqs, [1] * B, [True] * B)
        res[f"forward_b{B}_ms"] = device_ms(lambda fb=fb: runner.forward(fb))
        print(f"B={B}: step {res[f'decode_step_b{B}_ms']:.2f} ms, forward "
              f"{res[f'forward_b{B}_ms']:.2f} ms, floor {res[f'floor_b{B}_ms']:.2f} ms",
              flush=True)

    # 128 distinct adapters, one per sequence, against the same step on the base
    for slot in range(1, 129):
        coefs = runner.table.data[0].cpu() + 0.02 * torch.randn(L, ecfg.groups, 10)
        runner.table.write(slot, coefs)
    base, mixed = seqs_for(128, [0] * 128), seqs_for(128, list(range(1, 129)))
    b_ms, m_ms = [], []
    for _ in range(5):
        b_ms.append(host_ms(lambda: engine_step(base), 3, 20))
        m_ms.append(host_ms(lambda: engine_step(mixed), 3, 20))
    res["base_b128_ms"], res["mixed_b128_ms"] = statistics.median(b_ms), statistics.median(m_ms)
    res["mixed_vs_base_b128_ratio"] = res["mixed_b128_ms"] / res["base_b128_ms"]
    fb_b = runner.prepare(base, [1] * 128, [True] * 128)
    fb_m = runner.prepare(mixed, [1] * 128, [True] * 128)
    res["forward_mixed_vs_base_b128_ratio"] = (device_ms(lambda: runner.forward(fb_m))
                                               / device_ms(lambda: runner.forward(fb_b)))


def bench_hf(ckpt: Path, cfg: LlamaConfig, res: dict, small: bool) -> None:
    """transformers' decode step with a StaticCache (eager, compiled) and its generate()."""
    from transformers import LlamaForCausalLM, StaticCache

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    B = 128
    with torch.inference_mode():
        try:
            cache = StaticCache(config=cfg, max_batch_size=B, max_cache_len=CTX + 64,
                                device=dev, dtype=torch.bfloat16)
        except TypeError:
            cache = StaticCache(config=cfg, max_cache_len=CTX + 64)
        ids = torch.randint(0, cfg.vocab_size, (B, CTX), device=dev)
        for s in range(0, CTX, 128):
            model(input_ids=ids[:, s:s + 128], past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(s, s + 128, device=dev), logits_to_keep=1)
        tok = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
        pos = torch.tensor([CTX], device=dev)

        def step():
            return model(input_ids=tok, past_key_values=cache, cache_position=pos,
                         use_cache=True, logits_to_keep=1)

        res["hf_static_eager_b128_ms"] = device_ms(step)
        print(f"hf eager b128 {res['hf_static_eager_b128_ms']:.2f} ms", flush=True)
        if not small:
            try:
                t = time.perf_counter()
                cstep = torch.compile(step, mode="reduce-overhead", fullgraph=False)
                for _ in range(3):
                    cstep()
                sync()
                res["hf_compile_s"] = time.perf_counter() - t
                res["hf_static_compiled_b128_ms"] = device_ms(cstep)
                print(f"hf compiled b128 {res['hf_static_compiled_b128_ms']:.2f} ms", flush=True)
            except Exception as e:  # record, keep benchmarking the rest
                res["hf_compile_error"] = f"{type(e).__name__}: {e}"[:2000]
            torch._dynamo.reset()  # drops the compiled graphs and their memory pools

        n_req, n_prompt, n_new = THROUGHPUT
        prompts = torch.randint(0, cfg.vocab_size, (n_req, n_prompt), device=dev)
        sync()
        t = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompts))
        sync()
        wall = time.perf_counter() - t
        assert out.shape == (n_req, n_prompt + n_new)
        res["hf_generate_tok_s"] = n_req * n_new / wall
        print(f"hf generate {res['hf_generate_tok_s']:.0f} tok/s", flush=True)



def bench_prefill(ckpt: Path, cfg: LlamaConfig, res: dict, small: bool) -> None:
    """prefill_tok_s: 8 prompts of 2,048 tokens (random ids) submitted at once to a started
    Engine, one new token each; prompt tokens / wall time to the last finish. Median of 3
    after a warm-up."""
    n_req, n_prompt = (8, 256) if small else PREFILL
    ecfg = EngineConfig(model=str(ckpt), load_format="dummy", max_num_seqs=64,
                        max_model_len=n_prompt + 64, max_num_batched_tokens=8192,
                        kv_memory_fraction=0.3, max_adapters=16, kv_cache_tokens_cpu=40_000)
    engine = Engine(ecfg).start()
    params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)

    def once() -> float:
        done: queue.SimpleQueue = queue.SimpleQueue()
        prompts = torch.randint(0, cfg.vocab_size, (n_req, n_prompt)).tolist()
        t = time.perf_counter()
        for p in prompts:
            engine.submit(p, params, on_event=lambda e: e.finish_reason and done.put(e))
        for _ in range(n_req):
            done.get(timeout=600)
        return n_req * n_prompt / (time.perf_counter() - t)

    once()
    runs = [once() for _ in range(3)]
    res["prefill_runs_tok_s"], res["prefill_tok_s"] = runs, statistics.median(runs)
    print(f"prefill {res['prefill_tok_s']:.0f} tok/s ({n_req} x {n_prompt})", flush=True)
    engine.shutdown()


def started_engine(ckpt: Path, cfg: LlamaConfig, slots: int) -> tuple[Engine, list[bytes]]:
    """A started Engine for the closed-loop and load parts (256 seats, context 512 + 64, `slots`
    adapter slots) and 16 adapter files for it."""
    engine = Engine(EngineConfig(model=str(ckpt), load_format="dummy", max_num_seqs=256,
                                 max_model_len=CTX + 64, max_num_batched_tokens=8192,
                                 kv_memory_fraction=0.5, max_adapters=slots,
                                 kv_cache_tokens_cpu=200_000)).start()
    blobs = [random_adapter(engine.info.fingerprint, cfg.num_hidden_layers, s) for s in range(16)]
    return engine, blobs


def bench_engine(ckpt: Path, cfg: LlamaConfig, res: dict, small: bool) -> None:
    """Closed-loop throughput, with no adapter and with every request on its own adapter."""
    t = time.perf_counter()
    engine, blobs = started_engine(ckpt, cfg, 2 * THROUGHPUT[0])
    res["engine_init_s"] = time.perf_counter() - t
    n_req, n_prompt, n_new = THROUGHPUT
    params = SamplingParams(temperature=0, max_new_tokens=n_new, ignore_eos=True)

    def closed_loop(adapters: list[str | None]) -> float:
        done: queue.SimpleQueue = queue.SimpleQueue()
        prompts = torch.randint(0, cfg.vocab_size, (n_req, n_prompt)).tolist()
        t = time.perf_counter()
        for p, a in zip(prompts, adapters, strict=True):
            engine.submit(p, params, adapter=a,
                          on_event=lambda e: e.finish_reason and done.put(e))
        finished = [done.get(timeout=600) for _ in range(n_req)]
        wall = time.perf_counter() - t
        assert all(e.finish_reason == "length" and e.num_output_tokens == n_new
                   for e in finished), finished[0]
        return n_req * n_new / wall

    closed_loop([None] * n_req)  # warm-up: prefill shapes, sampling
    runs = [closed_loop([None] * n_req) for _ in range(3)]
    res["throughput_runs_tok_s"] = runs
    res["throughput_tok_s"] = statistics.median(runs)
    print(f"engine throughput {res['throughput_tok_s']:.0f} tok/s (median of "
          f"{', '.join(f'{r:.0f}' for r in runs)})", flush=True)

    for i in range(n_req):  # adapters of the mixed run
        engine.load_adapter(f"mix{i}", blobs[i % len(blobs)])
    res["throughput_mixed_tok_s"] = closed_loop([f"mix{i}" for i in range(n_req)])
    print(f"engine throughput, {n_req} adapters {res['throughput_mixed_tok_s']:.0f} tok/s",
          flush=True)
    engine.shutdown()


def bench_loads(ckpt: Path, cfg: LlamaConfig, res: dict, small: bool) -> None:
    """Adapter hot-load times into a 100,000-slot table, idle and while serving."""
    slots = 1000 if small else 100_000
    engine, blobs = started_engine(ckpt, cfg, slots)
    n_req = THROUGHPUT[0]
    res["adapter_file_bytes"] = len(blobs[0])
    times = []
    for i in range(slots):
        t = time.perf_counter()
        engine.load_adapter(f"a{i}", blobs[i % len(blobs)])
        times.append((time.perf_counter() - t) * 1e3)
    stats = engine.stats()
    res["adapters_loaded"] = len(engine.list_adapters())
    res["adapter_slots_used"], res["adapter_slots_total"] = stats.slots_used, stats.slots_total
    res["adapter_evictions"] = stats.adapter_evictions
    q = statistics.quantiles(times, n=100)
    res["adapter_load_ms_p50"], res["adapter_load_ms_p99"] = statistics.median(times), q[98]
    print(f"adapter load p50 {res['adapter_load_ms_p50']:.3f} ms p99 "
          f"{res['adapter_load_ms_p99']:.3f} ms; slots used {stats.slots_used}", flush=True)

    # loads while the engine decodes 256 requests
    done: queue.SimpleQueue = queue.SimpleQueue()
    long = SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)
    for _ in range(n_req):
        engine.submit(torch.randint(0, cfg.vocab_size, (64,)).tolist(), long,
                      on_event=lambda e: e.finish_reason and done.put(e))
    while engine.stats().num_running < n_req:
        time.sleep(0.01)
    busy, steps = [], engine.stats().steps
    for i in range(200 if small else 2000):
        t = time.perf_counter()
        engine.load_adapter(f"a{i}", blobs[(i + 1) % len(blobs)])  # replaces: new version
        busy.append((time.perf_counter() - t) * 1e3)
    res["busy_loads_during_steps"] = engine.stats().steps - steps
    for _ in range(n_req):
        done.get(timeout=600)
    q = statistics.quantiles(busy, n=100)
    res["adapter_load_busy_ms_p50"], res["adapter_load_busy_ms_p99"] = (
        statistics.median(busy), q[98])
    print(f"adapter load while serving p50 {res['adapter_load_busy_ms_p50']:.3f} ms p99 "
          f"{res['adapter_load_busy_ms_p99']:.3f} ms", flush=True)
    engine.shutdown()


ROWS = [("decode_step_b1_ms", "ms"), ("decode_step_b32_ms", "ms"), ("decode_step_b128_ms", "ms"),
        ("decode_step_b256_ms", "ms"), ("hf_static_eager_b128_ms", "ms"),
        ("hf_static_compiled_b128_ms", "ms"), ("mixed_vs_base_b128_ratio", "x"),
        ("throughput_tok_s", "tok/s"), ("prefill_tok_s", "tok/s"), ("hf_generate_tok_s", "tok/s"),
        ("adapter_load_ms_p50", "ms"), ("adapter_load_ms_p99", "ms")]


def run_parts(parts: dict, names: list[str], cfg, res: dict, small: bool, doc: dict,
              rows: list[tuple[str, str]], out: str) -> None:
    """Run each named part `parts[name](ckpt, cfg, res, small)` on a checkpoint directory made
    from `cfg` (the byte tokenizer, padded to its vocabulary), in turn; a failing part leaves
    an `<name>_error` and the others run on. After each part, `doc` (its rows: those of `rows`
    found in `res`) is written to `out`, so a run cut short keeps what it measured."""
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        cfg.save_pretrained(ckpt)
        byte_tokenizer(cfg.vocab_size).save_pretrained(ckpt)  # every id has text
        for name in names:
            t = time.perf_counter()
            try:
                parts[name](ckpt, cfg, res, small)
            except Exception as e:  # keep the other parts' numbers
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            res[f"{name}_s"] = time.perf_counter() - t
            free_memory()  # the part's model and caches went with its frame
            doc["rows"] = [{"name": n, "value": res[n], "unit": u} for n, u in rows if n in res]
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(doc, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="tiny model: check the script")
    ap.add_argument("--parts", default="runner,hf,prefill,engine,loads")
    args = ap.parse_args()
    cfg = model_config(args.small)
    res: dict = {"copy_tbps": copy_tbps()}
    doc = {"device": versions().get("device", "cpu"),
           "date": datetime.date.today().isoformat(), "versions": versions(),
           "command": "PYTHONPATH=. python " + " ".join(sys.argv), "rows": [], "detail": res}

    run_parts({"runner": bench_runner, "hf": bench_hf, "prefill": bench_prefill,
               "engine": bench_engine, "loads": bench_loads},
              args.parts.split(","), cfg, res, args.small, doc, ROWS, args.out)
    print()
    print(f"{'row':32s} {'value':>10s}")
    for r in doc["rows"]:
        print(f"{r['name']:32s} {r['value']:10.3f} {r['unit']}")
    for k in ("floor_b128_ms", "forward_b128_ms", "throughput_mixed_tok_s",
              "adapter_load_busy_ms_p50", "adapter_load_busy_ms_p99", "copy_tbps"):
        if k in res:
            print(f"{k:32s} {res[k]:10.3f}")


if __name__ == "__main__":
    main()
