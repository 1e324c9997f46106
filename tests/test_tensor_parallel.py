"""Tensor parallelism on the CPU (issue 14): 2 processes joined by gloo compute what one does.

The tiny test model (4 query heads, 2 KV heads, 384 MLP channels in 8 rational groups; its
tied embedding cut to 263 rows, which do not split evenly) over 2 ranks, float32: logits of
mixed-adapter prefill and decode steps and greedy tokens equal one process's, each rank holding
only its vocabulary slice; adapter load, replace and unload reach the worker; a killed worker
stops the engine (error set, nora-serve exits non-zero) within seconds instead of hanging.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nora_runtime.adapter import adapter_to_bytes
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine
from nora_runtime.llama import LlamaModel
from nora_runtime.lora import PROJECTIONS, pack_peft_files
from nora_runtime.lora_pool import projection_shapes
from nora_runtime.parallel import (
    ColumnParallelLinear,
    ParallelLinears,
    TableShard,
    head_slice,
    load_weights_sharded,
    projection_slices,
    vocab_slice,
)
from nora_runtime.sampling import SamplingParams
from nora_runtime.table import CoefficientTable
from nora_runtime.tiny import byte_tokenizer, random_adapter, tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)
PROMPTS = ["Hello", "abc def ghi", "xyz"]
TIMEOUT = 60


def config(tp: int, **kw) -> EngineConfig:
    kw = {"model": str(tiny_checkpoint()), **kw}
    return EngineConfig(device="cpu", dtype="float32", block_size=4, kv_cache_tokens_cpu=512,
                        max_adapters=4, max_lora_adapters=2, tensor_parallel_size=tp, **kw)


ODD_VOCAB = 263  # over 2 ranks: 132 rows and 131


@pytest.fixture(scope="module")
def odd_vocab_checkpoint(tmp_path_factory):
    """The tiny checkpoint (tied embeddings) with its vocabulary cut to ODD_VOCAB rows (the
    byte tokenizer's ids stop at 258): the same model otherwise, so adapters that change its
    greedy tokens still do."""
    path = tmp_path_factory.mktemp("odd-vocab")
    for f in tiny_checkpoint().iterdir():
        shutil.copy(f, path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": ODD_VOCAB}))
    weights = load_file(path / "model.safetensors")
    weights = {k: v[:ODD_VOCAB] if k in ("model.embed_tokens.weight", "lm_head.weight") else v
               for k, v in weights.items()}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def engines(odd_vocab_checkpoint):
    one = Engine(config(1, model=str(odd_vocab_checkpoint))).start()
    two = Engine(config(2, model=str(odd_vocab_checkpoint))).start()
    yield one, two
    two.shutdown()
    one.shutdown()
    assert all(p.poll() is not None for p in two.runner.tp.procs)


def adapter_bytes(engine: Engine, seed: int) -> bytes:
    return adapter_to_bytes(random_adapter(engine.info, seed),
                            base_fingerprint=engine.info.fingerprint)


def lora_bytes(engine: Engine, seed: int, r: int = 4) -> bytes:
    """A packed PEFT LoRA on all seven projections of `engine`'s model (random factors, large
    enough to change greedy tokens)."""
    hf = engine.runner.hf_config
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for l in range(hf.num_hidden_layers):
        for m, (n_in, n_out) in projection_shapes(hf).items():
            part = "self_attn" if m in PROJECTIONS[:4] else "mlp"
            key = f"base_model.model.model.layers.{l}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.2
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": list(PROJECTIONS),
              "bias": "none", "use_dora": False}
    return pack_peft_files(config, save(tensors))


def greedy(engine: Engine, prompts, adapters) -> list[list[int]]:
    """Greedy tokens of all prompts, submitted together (one batch, mixed adapters)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        engine.submit(p, GREEDY, adapter=a, on_event=lambda e, i=i: events.put((i, e)))
    out: list[list[int]] = [[] for _ in prompts]
    pending = len(prompts)
    while pending:
        i, e = events.get(timeout=TIMEOUT)
        assert e.error is None, e.error
        out[i] += e.token_ids
        pending -= e.finish_reason is not None
    return out


class Seq:
    def __init__(self, tokens: list[int], block_table: list[int], slot: int) -> None:
        self.tokens, self.block_table, self.slot, self.num_computed = tokens, block_table, slot, 0

    def token_slice(self, start: int, stop: int) -> list[int]:
        return self.tokens[start:stop]


def logits_of_steps(engine: Engine, slots: list[int]) -> list[torch.Tensor]:
    """Run a chunked prefill, a mixed prefill + decode step and two decode steps of
    sequences (one per slot) through the engine's runner (idle meanwhile; its blocks 100 on are
    free); every step's logits of every new token."""
    r = engine.runner
    seqs = [Seq([(7 * i + 3 * k) % 256 for k in range(11)], [100 + 4 * i + b for b in range(4)],
                s) for i, s in enumerate(slots)]
    out = []
    for num_new in ([5, 11, 3, 2], [1, 0, 8, 9], [1, 1, 1, 1], [1, 1, 1, 1]):
        live = [(s, n) for s, n in zip(seqs, num_new, strict=True) if n]
        for s, _ in live:  # a decode step appends the next token first
            if s.num_computed == len(s.tokens):
                s.tokens.append(5 * len(s.tokens) % 256)
        batch = r.prepare([s for s, _ in live], [n for _, n in live], [True] * len(live))
        rows, start = [], 0
        for _, n in live:
            rows += range(start, start + n)
            start += n
        batch.sample_index = torch.tensor(rows)
        out.append(r.forward(batch))
        for s, n in live:
            s.num_computed += n
    return out


def test_logits_and_greedy_tokens_equal_one_process(engines):
    one, two = engines
    assert two.info.kv_cache_tokens == one.info.kv_cache_tokens
    attn = two.runner.model.layers[0].self_attn
    assert (attn.nh, attn.nkv) == (2, 1)  # half the heads, one KV head, on each rank
    assert two.runner.k_cache.shape[2] == 1
    # vocab-parallel: each rank holds its slice of the tied embedding / head, nothing more
    model = two.runner.model
    assert model.lm_head.weight is model.embed_tokens.weight
    shapes = two.runner.tp.parameter_shapes(model)
    assert [s["embed_tokens.weight"] for s in shapes] == [(132, 128), (131, 128)]
    assert not any("lm_head.weight" in s for s in shapes)  # tied: one tensor
    assert one.runner.model.embed_tokens.weight.shape == (ODD_VOCAB, 128)  # one process: all
    slots = {}
    for e in engines:
        e.load_adapter("a", adapter_bytes(e, 1))
        e.load_adapter("b", adapter_bytes(e, 2))
        e.load_adapter("l", lora_bytes(e, 3))
        holds = [e.hold_adapter(a) for a in ("a", "b", "l")]
        slots[e] = [0] + [h.take() for h in holds]
    try:
        assert slots[one] == slots[two]
        ref, got = logits_of_steps(one, slots[one]), logits_of_steps(two, slots[two])
        for x, y in zip(ref, got, strict=True):
            assert y.shape == x.shape == (x.shape[0], ODD_VOCAB)
            torch.testing.assert_close(y, x, rtol=0, atol=2e-4)
            assert torch.equal(y.argmax(-1), x.argmax(-1))
        adapters = [None, "a", "b", "l"]
        prompts = [*PROMPTS, "LoRA"]
        assert greedy(two, prompts, adapters) == greedy(one, prompts, adapters)
        assert greedy(one, ["LoRA"], ["l"]) != greedy(one, ["LoRA"], [None])  # it does adapt
    finally:
        for e in engines:
            for s in slots[e][1:]:
                e.registry.release(s)
            for a in ("a", "b", "l"):
                e.unload_adapter(a)


def test_adapter_load_replace_unload_reach_every_rank(engines):
    one, two = engines
    base = greedy(two, PROMPTS, [None] * 3)
    assert base == greedy(one, PROMPTS, [None] * 3)
    seen = []
    tp, table = two.runner.tp, two.runner.table
    assert tp.tables_agree(table)
    adapters = ["x", "y", "x"]  # x: NoRA, y: LoRA
    # load, then replace in place; seeds that change the tiny model's greedy tokens (its
    # random weights make most prompts repeat one token whatever the adapter)
    for seed in (3, 5):
        for e in engines:
            e.load_adapter("x", adapter_bytes(e, seed))
            e.load_adapter("y", lora_bytes(e, seed))
        assert tp.tables_agree(table)
        got = greedy(two, PROMPTS, adapters)
        assert got == greedy(one, PROMPTS, adapters)
        seen.append(got)
    for i in (0, 1):  # the NoRA prompt and the LoRA prompt change at load and at replace
        assert base[i] != seen[0][i] != seen[1][i] != base[i]
    for e in engines:
        e.unload_adapter("x")
        e.unload_adapter("y")
    # the freed slot is back to the base on every rank
    assert greedy(two, PROMPTS, [None] * 3) == base
    t = table.data
    assert torch.equal(t[1:], t[0].expand_as(t[1:])) and tp.tables_agree(table)


def test_sharding_rules():
    table = CoefficientTable(torch.arange(10.0), slots=2, groups=8, sites=3)
    assert [TableShard(table, r, 2).site(1).shape for r in (0, 1)] == [(2, 4, 10)] * 2
    assert (TableShard(table, 5, 16).g0, TableShard(table, 5, 16).g1) == (2, 3)
    with pytest.raises(ValueError, match="divide"):
        TableShard(table, 0, 3)
    def heads(nh, nkv, size):
        return [(head_slice(nh, nkv, r, size).start, head_slice(nh, nkv, r, size).stop)
                for r in range(size)]

    assert heads(4, 2, 2) == [(0, 2), (2, 4)] and heads(2, 2, 2) == [(0, 1), (1, 2)]
    # SmolLM2-135M over 2 ranks: 3 KV heads go 1 + 2, their query heads 3 + 6
    assert heads(3, 3, 2) == [(0, 1), (1, 3)] and heads(9, 3, 2) == [(0, 3), (3, 9)]
    # more ranks than KV heads: the KV heads are replicated, their query heads split
    assert heads(2, 2, 4) == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert heads(8, 2, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="split"):
        head_slice(6, 2, 0, 4)  # 3 query heads per KV head do not split over 2 ranks
    # fused q | k | v, 4 query heads over 2 KV heads of 4 features: each section on its own
    qkv = ColumnParallelLinear(8, [(16, 4), (8, 2), (8, 2)], bias=False, rank=3, size=4,
                               kv_heads=2)
    assert qkv.rows == [slice(12, 16), slice(4, 8), slice(4, 8)]  # the last KV head, replicated
    assert qkv.sections == [4, 4, 4] and qkv.out_features == 12
    assert qkv.shard_index("bias", 1) == (slice(4, 8),)
    gate_up = ColumnParallelLinear(8, [(6, None), (6, None)], bias=False, rank=1, size=2)
    assert gate_up.rows == [slice(3, 6)] * 2 and gate_up.out_features == 6
    with pytest.raises(ValueError, match="split"):
        ColumnParallelLinear(8, [(6, None)], bias=False, rank=0, size=4)
    # vocabulary: ceil(V / N) rows a rank, the last one the rest
    assert [vocab_slice(263, r, 2) for r in (0, 1)] == [slice(0, 132), slice(132, 263)]
    assert [vocab_slice(10, r, 4) for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 9),
                                                        slice(9, 10)]
    with pytest.raises(ValueError, match="no rows"):
        vocab_slice(5, 0, 4)  # 2, 2, 1, 0 rows


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_load_puts_each_qkv_section_in_place(size, tmp_path):
    """Each rank's fused qkv_proj (weights and Qwen2's biases, made random) holds the rows of
    q_proj, k_proj and v_proj that projection_slices (its LoRA's) says it computes: 4 query
    heads, 2 KV heads, over 2 ranks and over 4 (KV heads replicated). No processes: each rank's
    model is built and loaded alone."""
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf.save_pretrained(tmp_path)
    attn = hf.model.layers[0].self_attn
    for rank in range(size):
        group = SimpleNamespace(rank=rank, size=size)  # all that building the layers reads
        model = LlamaModel(cfg, None, "silu", "residual", linears=ParallelLinears(group))
        load_weights_sharded(model, tmp_path)
        ours = model.layers[0].self_attn
        slices = projection_slices(cfg, rank, size)
        for leaf in ("weight", "bias"):
            want = torch.cat([getattr(getattr(attn, m), leaf)[slices[m][1]]
                              for m in ("q_proj", "k_proj", "v_proj")])
            assert torch.equal(getattr(ours.qkv_proj, leaf), want)
        assert (ours.nh, ours.nkv) == (4 // size, 1)


def test_config_and_flag(monkeypatch):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    from nora_server.cli import configs

    monkeypatch.delenv("NORA_TENSOR_PARALLEL_SIZE", raising=False)
    assert configs([])[1].tensor_parallel_size == 1
    assert configs(["--tensor-parallel-size", "2"])[1].tensor_parallel_size == 2
    t0 = time.monotonic()  # 2 KV heads over 3 ranks: refused before any worker starts
    with pytest.raises(ValueError, match="do not split over tensor_parallel_size=3"):
        Engine(config(3))
    with pytest.raises(ValueError, match="must divide one another"):
        Engine(config(2, groups=3))
    assert time.monotonic() - t0 < 5


def wait_until(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uneven_checkpoint(tmp_path_factory):
    """A Llama with 6 query and 3 KV heads: over 2 ranks, one KV head on rank 0, two on 1;
    untied embedding and head of 263 rows: 132 on rank 0, 131 on 1."""
    path = tmp_path_factory.mktemp("uneven")
    cfg = LlamaConfig(vocab_size=ODD_VOCAB, hidden_size=96, intermediate_size=192,
                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                      initializer_range=0.1, tie_word_embeddings=False, bos_token_id=256,
                      eos_token_id=257)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_uneven_kv_split_then_a_dead_worker_fails_the_engine_clearly(uneven_checkpoint):
    """One engine for two checks (each TP engine spawns a worker: seconds on a 2-core CI):
    KV heads and an untied vocabulary that do not divide over the ranks give one process's
    logits and tokens; then a worker killed
    mid-generation ends its request with an error and stops the engine (error set, new
    requests refused) within seconds."""
    model = str(uneven_checkpoint)
    one = Engine(config(1, model=model)).start()
    engine = Engine(config(2, model=model)).start()
    try:
        assert engine.runner.model.layers[0].self_attn.nkv == 1  # rank 0's share
        shapes = engine.runner.tp.parameter_shapes(engine.runner.model)
        for name in ("embed_tokens.weight", "lm_head.weight"):
            assert [s[name] for s in shapes] == [(132, 96), (131, 96)]
        for x, y in zip(logits_of_steps(one, [0] * 4), logits_of_steps(engine, [0] * 4),
                        strict=True):
            assert y.shape == x.shape == (x.shape[0], ODD_VOCAB)
            torch.testing.assert_close(y, x, rtol=0, atol=2e-4)
        for e in (one, engine):
            e.load_adapter("a", adapter_bytes(e, 5))
            e.load_adapter("l", lora_bytes(e, 6))
        adapters = [None, "a", "l"]
        assert greedy(engine, PROMPTS, adapters) == greedy(one, PROMPTS, adapters)
        events: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit("Hello", SamplingParams(temperature=0, max_new_tokens=400,
                                              ignore_eos=True), on_event=events.put)
        assert events.get(timeout=TIMEOUT).finish_reason is None  # generating
        os.kill(engine.runner.tp.procs[0].pid, signal.SIGKILL)
        while (last := events.get(timeout=TIMEOUT)).finish_reason is None:
            pass
        assert last.finish_reason == "error" and "tensor-parallel" in last.error
        wait_until(lambda: engine.error is not None)
        assert "worker" in engine.error and not engine.alive
        with pytest.raises(RuntimeError):
            engine.submit("Hello", GREEDY, on_event=lambda e: None)
    finally:
        t0 = time.monotonic()
        engine.shutdown()
        one.shutdown()
        assert time.monotonic() - t0 < 10


def test_dead_worker_stops_nora_serve_with_a_nonzero_exit(tmp_path):
    """nora-serve with 2 ranks, a worker killed: the engine stops, health goes NOT_SERVING as
    the server drains, and the process exits with status 1 (for a restart)."""
    env = {**os.environ, "NORA_LOG_LEVEL": "WARNING", "NORA_TP_TIMEOUT": "20"}
    cmd = [sys.executable, "-m", "nora_server.cli", "--model", str(tiny_checkpoint()),
           "--device", "cpu", "--port", "0", "--http-port", "off", "--metrics-port", "off",
           "--kv-cache-tokens-cpu", "512", "--tensor-parallel-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    output = []

    def wait_for(prefix: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while True:
            line = lines.get(timeout=max(0.01, end - time.monotonic()))
            output.append(line)
            if line.startswith(prefix):
                return line

    try:
        wait_for("nora: serving")
        workers = [pid for pid in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                                 capture_output=True, text=True).stdout.split()
                   if b"worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 1, workers
        os.kill(int(workers[0]), signal.SIGKILL)
        wait_for("nora: the engine stopped; exiting", timeout=30)
        assert proc.wait(timeout=30) == 1
    except BaseException:
        print("".join(output))
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
