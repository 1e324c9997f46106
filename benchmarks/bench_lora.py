"""LoRA / NoRA++ serving benchmarks (issue 13) on an 8B-shaped Llama with random bf16 weights
(load_format="dummy", as bench_engine.py), beside PEFT's mixed batch as the anchor.

Run on a CUDA machine from the repo root:
    PYTHONPATH=. python benchmarks/bench_lora.py --out benchmarks/results/lora-h200.json
`--smoke` runs the same code on a tiny model, batch 8 at context 32, few repeats (CPU works;
tests run it): it checks the script, its numbers mean nothing.

Rows (medians of interleaved repeats after warm-up):
- lora_mixed_vs_base_b128_ratio: one engine decode step (prepare, forward = CUDA graph replay,
  greedy sampling, tokens to the host) at batch 128, context 512, 128 sequences on 128 distinct
  r = 16 LoRAs on all seven projections, over the same step with no adapter. Target <= 1.5;
  lora_floor_ratio beside it = (weights + KV + 128 adapters' factors) / (weights + KV), the
  byte floor's ratio (~1.45 at the 8B shape). forward_lora_vs_base_b128_ratio: forward only.
- norapp_mixed_vs_base_b128_ratio: the same with 128 NoRA++ adapters (LoRA as above plus
  distinct NoRA coefficients) over no adapter.
- lora_load_ms_p50 / _p99: Engine.load_adapter of one packed r = 16 all-linear PEFT LoRA (bf16
  factors, ~84 MB) from bytes, replacing idle ids in place: parse, validate, pool write.
- peft_mixed8_vs_base_b128_ratio (anchor): transformers + peft, 8 LoRA r = 16 adapters mixed
  in one b128 decode forward (adapter_names=), over the same model without LoRA; eager, as the
  anchors measured it (../shared/anchors: 550.4 ms vs 38.2 ms, 14.4x).

The 128 adapters' factors are random tensors written straight into the pool rows (generating
128 x 84 MB of files on the host would dominate the run); the load row goes through the full
file path.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (  # noqa: E402  (benchmarks/ is not a package)
    CTX,
    Seq,
    copy_tbps,
    device_ms,
    host_ms,
    model_config,
    run_parts,
    versions,
)

from nora_runtime.config import EngineConfig  # noqa: E402
from nora_runtime.engine import Engine  # noqa: E402
from nora_runtime.lora import ATTENTION, PROJECTIONS, pack_peft_files  # noqa: E402
from nora_runtime.lora_pool import projection_shapes  # noqa: E402
from nora_runtime.model_runner import ModelRunner  # noqa: E402
from nora_runtime.sampling import SamplingParams, sample  # noqa: E402

RANK = 16
BATCH = 128  # --smoke: SMOKE_B sequences at SMOKE_CTX
SMOKE_B, SMOKE_CTX = 8, 32
ROWS = [("lora_mixed_vs_base_b128_ratio", "x"), ("norapp_mixed_vs_base_b128_ratio", "x"),
        ("lora_floor_ratio", "x"), ("forward_lora_vs_base_b128_ratio", "x"),
        ("forward_norapp_vs_base_b128_ratio", "x"), ("base_b128_ms", "ms"),
        ("lora_b128_ms", "ms"), ("norapp_b128_ms", "ms"), ("lora_load_ms_p50", "ms"),
        ("lora_load_ms_p99", "ms"), ("peft_mixed8_vs_base_b128_ratio", "x"),
        ("kernels_layer_default_us", "us"), ("kernels_layer_per_token_us", "us")]


def peft_lora_bytes(cfg, seed: int, dtype: torch.dtype = torch.bfloat16, *, rank: int = RANK,
                    targets: tuple[str, ...] = PROJECTIONS,
                    generator: torch.Generator | None = None) -> bytes:
    """A packed PEFT LoRA of the model's shape: rank `rank` on `targets` of every layer, random
    factors (drawn from `generator` if given, else from a fresh one seeded with `seed`)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    shapes = projection_shapes(cfg)
    tensors = {}
    for l in range(cfg.num_hidden_layers):
        for m in targets:
            n_in, n_out = shapes[m]
            part = "self_attn" if m in ATTENTION else "mlp"
            key = f"base_model.model.model.layers.{l}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g)
                                               * n_in ** -0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g)
                                               * 0.01).to(dtype)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": list(targets), "use_dora": False, "use_rslora": False}
    return pack_peft_files(config, st_save(tensors))


def bench_runner(ckpt: Path, cfg, res: dict, smoke: bool) -> None:
    B, ctx = (SMOKE_B, SMOKE_CTX) if smoke else (BATCH, CTX)
    ecfg = EngineConfig(model=str(ckpt), load_format="dummy", max_num_seqs=B,
                        max_model_len=CTX + 64, max_num_batched_tokens=8192,
                        kv_memory_fraction=0.3, max_adapters=2 * B, max_lora_adapters=B,
                        max_lora_rank=RANK, kv_cache_tokens_cpu=B * (CTX + 64))
    runner = ModelRunner(ecfg, ckpt)
    runner.k_cache.normal_()
    runner.v_cache.normal_()
    pool, L = runner.lora, cfg.num_hidden_layers
    res["lora_pool_gb"] = pool.nbytes / 1e9
    for key in pool.A:  # rows 1..128: random r = 16 factors on every projection
        pool.A[key][1:].normal_(0.0, pool.A[key].shape[2] ** -0.5)
        pool.B[key][1:].normal_(0.0, 0.01)
        pool.scale[key][1:] = 2.0
    per_adapter = sum(t[1].nbytes for d in (pool.A, pool.B) for t in d.values())
    weights = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                  if not n.startswith("embed_tokens"))
    nkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    kv = B * ctx * L * 2 * nkv * d * runner.k_cache.element_size()
    res["lora_adapter_mb"] = per_adapter / 1e6
    res["lora_floor_ratio"] = (weights + kv + B * per_adapter) / (weights + kv)
    per_seq = -(-(ctx + 1) // runner.block_size)
    greedy = SamplingParams(temperature=0)

    def seqs_for(slots: list[int]) -> list[Seq]:
        return [Seq(ctx, list(range(i * per_seq, (i + 1) * per_seq)), slots[i], cfg.vocab_size)
                for i in range(B)]

    def step(seqs: list[Seq]) -> None:
        fb = runner.prepare(seqs, [1] * B, [True] * B)
        logits = runner.forward(fb)
        sample(logits, [greedy] * B, [None] * B, [()] * B).tokens.tolist()

    def bind(nora: bool) -> None:
        for i in range(1, B + 1):  # table slot i -> pool row i
            pool.bind(i, i, lora_only=not nora)
            if nora:
                coefs = runner.table.data[0].cpu() + 0.02 * torch.randn(L, ecfg.groups, 10)
                runner.table.write(i, coefs)

    base, mixed = seqs_for([0] * B), seqs_for(list(range(1, B + 1)))
    reps, inner = (1, 2) if smoke else (5, 20)
    for kind, nora in (("lora", False), ("norapp", True)):
        bind(nora)
        b_ms, m_ms = [], []
        for _ in range(reps):
            b_ms.append(host_ms(lambda: step(base), 1 if smoke else 3, inner))
            m_ms.append(host_ms(lambda: step(mixed), 1 if smoke else 3, inner))
        res["base_b128_ms"] = statistics.median(b_ms)
        res[f"{kind}_b128_ms"] = statistics.median(m_ms)
        res[f"{kind}_mixed_vs_base_b128_ratio"] = res[f"{kind}_b128_ms"] / res["base_b128_ms"]
        fb_b = runner.prepare(base, [1] * B, [True] * B)
        fb_m = runner.prepare(mixed, [1] * B, [True] * B)
        res[f"forward_{kind}_vs_base_b128_ratio"] = (
            device_ms(lambda fb=fb_m: runner.forward(fb))
            / device_ms(lambda fb=fb_b: runner.forward(fb)))
        print(f"{kind}: {res[f'{kind}_b128_ms']:.2f} ms vs base {res['base_b128_ms']:.2f} ms "
              f"= {res[f'{kind}_mixed_vs_base_b128_ratio']:.3f}x (floor "
              f"{res['lora_floor_ratio']:.3f}x)", flush=True)


def bench_kernels(ckpt: Path, cfg, res: dict, smoke: bool) -> None:
    """lora_forward alone on each projection's shape: B tokens on B distinct r = 16 pool rows,
    the default tuning against one program per token (the first kernel's launch: split = K,
    block_k 128, block_n 64) and a few alternatives; microseconds and GB/s of factors read."""
    from nora_runtime.kernels.lora import lora_forward, lora_ref

    B = SMOKE_B if smoke else BATCH
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    variants = {"default": {}, "per_token": {"block_k": 128, "block_n": 64, "split": None},
                "split_4x": {"split": 1024}, "split_16x": {"split": 256},
                "block_n_128": {"block_n": 128}, "block_n_512": {"block_n": 512},
                "warps_8": {"num_warps": 8}}
    total = {v: 0.0 for v in variants}
    for m, (n_in, n_out) in projection_shapes(cfg).items():
        A = torch.randn(B + 1, RANK, n_in, device=dev).to(dtype) * n_in ** -0.5
        Bf = torch.randn(B + 1, n_out, RANK, device=dev).to(dtype) * 0.01
        scale = torch.full((B + 1,), 2.0, device=dev)
        idx = torch.arange(1, B + 1, dtype=torch.int32, device=dev)
        x = torch.randn(B, n_in, device=dev).to(dtype)
        y = torch.randn(B, n_out, device=dev).to(dtype)
        want = lora_ref(y.clone(), x, A, Bf, scale, idx).float()
        factors = B * RANK * (n_in + n_out) * A.element_size()
        for v, kw in variants.items():
            kw = dict(kw)
            if v == "per_token":
                kw["split"] = 1 << (n_in - 1).bit_length()
            got = lora_forward(y.clone(), x, A, Bf, scale, idx, **kw).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            args = (y, x, A, Bf, scale, idx)
            us = device_ms(lambda args=args, kw=kw: lora_forward(*args, **kw)) * 1e3
            total[v] += us
            res[f"kernel_{m}_{v}_us"] = us
            res[f"kernel_{m}_{v}_gbs"] = factors / (us * 1e-6) / 1e9
            res[f"kernel_{m}_{v}_rel_err"] = err
        print(f"{m:9s} K {n_in:6d} N {n_out:6d}  " + "  ".join(
            f"{v} {res[f'kernel_{m}_{v}_us']:6.1f} us ({res[f'kernel_{m}_{v}_gbs']:5.0f} GB/s)"
            for v in ("per_token", "default")), flush=True)
    for v, us in total.items():
        res[f"kernels_layer_{v}_us"] = us
    print("one layer, all seven projections: " + ", ".join(
        f"{v} {us:.0f} us" for v, us in total.items()), flush=True)


def bench_load(ckpt: Path, cfg, res: dict, smoke: bool) -> None:
    ecfg = EngineConfig(model=str(ckpt), load_format="dummy", max_num_seqs=8,
                        max_model_len=256, max_num_batched_tokens=256, kv_memory_fraction=0.05,
                        max_adapters=16, max_lora_adapters=8, max_lora_rank=RANK,
                        kv_cache_tokens_cpu=1024, cuda_graphs=False)
    engine = Engine(ecfg)
    data = peft_lora_bytes(cfg, 0)
    res["lora_file_mb"] = len(data) / 1e6
    n = 4 if smoke else 100
    for i in range(8):  # warm-up: every id once (the later loads replace idle ids in place)
        engine.load_adapter(f"l{i}", data)
    times = []
    for i in range(n):
        t = time.perf_counter()
        engine.load_adapter(f"l{i % 8}", data)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    res["lora_load_ms_p50"] = statistics.median(times)
    res["lora_load_ms_p99"] = times[min(n - 1, int(0.99 * n))]
    print(f"lora load: p50 {res['lora_load_ms_p50']:.2f} ms, p99 "
          f"{res['lora_load_ms_p99']:.2f} ms ({res['lora_file_mb']:.1f} MB)", flush=True)
    engine.shutdown()


def bench_peft(ckpt: Path, cfg, res: dict, smoke: bool) -> None:
    """The anchor: PEFT's mixed batch of 8 LoRA adapters, b128 decode-shaped forward (eager;
    no KV cache, one token per row, as ../shared/anchors/anchor_device.py measures it)."""
    import peft
    from transformers import LlamaForCausalLM

    B = SMOKE_B if smoke else BATCH
    res["peft"] = peft.__version__
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
    with torch.inference_mode():
        res["peft_base_b128_ms"] = device_ms(lambda: model(input_ids=ids, logits_to_keep=1))
        lcfg = dict(r=RANK, lora_alpha=2 * RANK, target_modules=list(PROJECTIONS),
                    init_lora_weights=False)
        pm = peft.get_peft_model(model, peft.LoraConfig(**lcfg), adapter_name="a0")
        for i in range(1, 8):
            pm.add_adapter(f"a{i}", peft.LoraConfig(**lcfg))
        pm.to(dtype).eval()
        names = [f"a{i % 8}" for i in range(B)]
        res["peft_mixed8_b128_ms"] = device_ms(
            lambda: pm(input_ids=ids, adapter_names=names, logits_to_keep=1))
    res["peft_mixed8_vs_base_b128_ratio"] = res["peft_mixed8_b128_ms"] / res["peft_base_b128_ms"]
    print(f"peft mixed8: {res['peft_mixed8_b128_ms']:.2f} ms vs {res['peft_base_b128_ms']:.2f} "
          f"ms = {res['peft_mixed8_vs_base_b128_ratio']:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few repeats (CPU works)")
    ap.add_argument("--parts", default="runner,load,peft")
    args = ap.parse_args(argv)
    cfg = model_config(args.smoke)
    res: dict = {"copy_tbps": copy_tbps()}
    doc = {"device": versions().get("device", "cpu"),
           "date": datetime.date.today().isoformat(), "versions": versions(),
           "command": "PYTHONPATH=. python benchmarks/bench_lora.py " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "rows": [], "detail": res}

    run_parts({"runner": bench_runner, "load": bench_load, "peft": bench_peft,
               "kernels": bench_kernels},
              args.parts.split(","), cfg, res, args.smoke, doc, ROWS, args.out)
    print(f"\n{'row':36s} {'value':>10s}")
    for r in doc["rows"]:
        print(f"{r['name']:36s} {r['value']:10.3f} {r['unit']}")
    return doc


if __name__ == "__main__":
    main()
