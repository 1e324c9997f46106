"""The paged prefill attention kernel (nora_runtime/kernels/prefill_attention.py) at Llama-3-8B's
attention shape (32 query heads over 8 KV heads of 128, bf16, KV blocks of 16 tokens), against
its torch reference (per sequence: gather the context through the block table, SDPA with a dense
causal mask), which is what prompt steps ran before the kernel.

    PYTHONPATH=. python benchmarks/bench_attention.py --out attention-h200      # CUDA
    PYTHONPATH=. python benchmarks/bench_attention.py --smoke                   # CPU, interpreter

Cases (one engine step's worth of new tokens each):
- prompts_64x128: 64 fresh prompts of 128 tokens (8,192 tokens: the closed loop's prompt steps)
- prompts_4x2048: 4 fresh prompts of 2,048 tokens
- chunks_8x512_ctx2048: 8 prompt chunks of 512 tokens after 1,536 cached ones
- mixed_4x512_128dec: 4 fresh prompts of 512 tokens and 128 decode rows at context 1,024

FLOPs counted = 4 * d * nh * sum over new tokens of the keys each sees (QK and PV, causal: a
token at position p sees p + 1 keys); TFLOP/s against the H200's ~790 dense bf16 (the device
notes' measured matmul rate). Each case is checked against the reference before it is timed;
times are triton.testing.do_bench medians (device events) after warm-up. Writes
benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
NH, NKV, D, BLOCK = 32, 8, 128, 16
CASES = {  # name -> [(new tokens, context after the step)] per sequence
    "prompts_64x128": [(128, 128)] * 64,
    "prompts_4x2048": [(2048, 2048)] * 4,
    "chunks_8x512_ctx2048": [(512, 2048)] * 8,
    "mixed_4x512_128dec": [(512, 512)] * 4 + [(1, 1024)] * 128,
}
SMOKE = {"prompts_3x9": [(9, 9)] * 3, "mixed_2x5_3dec": [(5, 12), (7, 7)] + [(1, 20)] * 3}


def make_case(seqs: list[tuple[int, int]], nh: int, nkv: int, d: int, dtype, device,
              seed: int = 0) -> dict:
    """Random q and caches for sequences of (new tokens, context); every sequence's blocks are
    scattered over the cache in a random order, as a long-running server's are."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-ctx // BLOCK) for _, ctx in seqs]
    order = torch.randperm(sum(blocks), generator=g)
    width = max(blocks)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[at:at + n]
        at += n
    rows = sum(blocks) * BLOCK
    n_new = [n for n, _ in seqs]
    q_start = torch.tensor([0, *np.cumsum(n_new)], dtype=torch.int32)
    return {
        "q": torch.randn(sum(n_new), nh, d, generator=g).to(device, dtype),
        "k": torch.randn(rows, nkv, d, generator=g).to(device, dtype),
        "v": torch.randn(rows, nkv, d, generator=g).to(device, dtype),
        "tables": tables.to(device), "q_start": q_start.to(device),
        "ctx": torch.tensor([c for _, c in seqs], dtype=torch.int32, device=device),
        "n_new": np.array(n_new), "ctx_np": np.array([c for _, c in seqs]),
    }


def flops(seqs: list[tuple[int, int]], nh: int, d: int) -> int:
    keys = sum(sum(range(ctx - n + 1, ctx + 1)) for n, ctx in seqs)
    return 4 * d * nh * keys


def run(cases: dict, nh: int, nkv: int, d: int, dtype, device) -> list[dict]:
    from nora_runtime.kernels.prefill_attention import (
        paged_prefill_attention,
        paged_prefill_attention_ref,
        prefill_block_q,
        prefill_tiles,
    )

    if device.type == "cuda":
        from triton.testing import do_bench

        def ms(fn):
            return do_bench(fn, warmup=25, rep=200, return_mode="median")
    else:
        import time

        def ms(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

    block_q = prefill_block_q(nh, nkv)
    out = []
    for name, seqs in cases.items():
        c = make_case(seqs, nh, nkv, d, dtype, device)
        tiles = torch.from_numpy(prefill_tiles(c["n_new"], block_q, c["ctx_np"])).to(device)
        args = (c["q"], c["k"], c["v"], c["tables"], c["ctx"], c["q_start"], BLOCK)

        def kernel(args=args, tiles=tiles):
            return paged_prefill_attention(*args, tiles, block_q)

        def reference(args=args):
            return paged_prefill_attention_ref(*args)

        want = reference().float()
        err = ((kernel().float() - want).abs().max() / want.abs().max()).item()
        k_ms, r_ms = ms(kernel), ms(reference)
        f = flops(seqs, nh, d)
        row = {"case": name, "sequences": len(seqs), "new_tokens": int(c["n_new"].sum()),
               "tiles": int(tiles.shape[0]), "kernel_ms": k_ms, "reference_ms": r_ms,
               "speedup": r_ms / k_ms, "kernel_tflops": f / (k_ms * 1e-3) / 1e12,
               "rel_err": err}
        out.append(row)
        print(f"{name:24s} kernel {k_ms:8.3f} ms ({row['kernel_tflops']:6.1f} TFLOP/s)  "
              f"reference {r_ms:8.3f} ms  x{row['speedup']:.1f}  rel err {err:.1e}", flush=True)
    return out


def sweep(cases: dict, nh: int, nkv: int, d: int, dtype, device) -> list[dict]:
    """Time the kernel over block sizes, warps and stages on every case (CUDA): the tuning
    table. A config that does not fit (shared memory, registers) is recorded as failed."""
    import itertools

    from triton.testing import do_bench

    from nora_runtime.kernels.prefill_attention import (
        paged_prefill_attention,
        paged_prefill_attention_ref,
        prefill_block_q,
        prefill_tiles,
    )

    rows = []
    made = {name: make_case(seqs, nh, nkv, d, dtype, device) for name, seqs in cases.items()}
    want = {name: paged_prefill_attention_ref(c["q"], c["k"], c["v"], c["tables"], c["ctx"],
                                              c["q_start"], BLOCK).float()
            for name, c in made.items()}
    for bm, bn, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), (4, 8),
                                                   (1, 2, 3)):
        if bm == 128 and bn == 128:
            continue
        block_q = prefill_block_q(nh, nkv, bm)
        kw = {"block_q": block_q, "block_n": bn, "num_warps": warps, "num_stages": stages}
        row = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
        for name, c in made.items():
            tiles = torch.from_numpy(prefill_tiles(c["n_new"], block_q, c["ctx_np"])).to(device)

            def fn(c=c, tiles=tiles, kw=kw):
                return paged_prefill_attention(c["q"], c["k"], c["v"], c["tables"], c["ctx"],
                                               c["q_start"], BLOCK, tiles, **kw)
            try:
                err = ((fn().float() - want[name]).abs().max() / want[name].abs().max()).item()
                row[name] = do_bench(fn, warmup=10, rep=60, return_mode="median")
                row[name + "_err"] = err
            except Exception as e:  # out of resources: keep sweeping
                row[name] = float("nan")
                row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items() if not k.endswith("_err")), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results name under benchmarks/results/")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton's "
                   "interpreter): checks the script, its numbers mean nothing")
    p.add_argument("--sweep", action="store_true", help="also time block sizes, warps and "
                   "stages (CUDA); the table goes to the json's 'sweep'")
    a = p.parse_args(argv)
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    nh, nkv, d = (4, 2, 16) if a.smoke else (NH, NKV, D)
    rows = run(SMOKE if a.smoke else CASES, nh, nkv, d, dtype, device)
    import triton

    doc = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
           f"CPU ({platform.machine()}, Triton interpreter)",
           "date": datetime.date.today().isoformat(),
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "triton": triton.__version__},
           "command": " ".join(["python", "benchmarks/bench_attention.py",
                                *(argv if argv is not None else sys.argv[1:])]),
           "shape": {"nh": nh, "nkv": nkv, "d": d, "block_size": BLOCK,
                     "dtype": str(dtype).removeprefix("torch.")},
           "rows": rows}
    if a.sweep and device.type == "cuda":
        doc["sweep"] = sweep(CASES, nh, nkv, d, dtype, device)
    if a.out:
        out = RESULTS / a.out
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        lines = [f"# Paged prefill attention ({a.out})", "",
                 f"{doc['date']}, {doc['device']}, torch {torch.__version__}, triton "
                 f"{triton.__version__}; nh {nh}, nkv {nkv}, d {d}, {doc['shape']['dtype']}, "
                 f"KV blocks of {BLOCK}. Command: `{doc['command']}`.", "",
                 "| case | new tokens | kernel ms | TFLOP/s | reference ms | speedup | rel err |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['new_tokens']:,} | {r['kernel_ms']:.3f} | "
                  f"{r['kernel_tflops']:.1f} | {r['reference_ms']:.3f} | {r['speedup']:.1f} | "
                  f"{r['rel_err']:.1e} |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return doc


if __name__ == "__main__":
    main()
