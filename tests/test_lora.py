"""LoRA and NoRA++ adapters end to end on CPU (issue 13): a tiny Llama saved to disk, LoRA
adapters made and saved by the real `peft` package and NoRA++ adapters by the trainer's code
path, loaded through Engine.load_adapter from the store. LoRA rows give PeftModel's logits and
greedy tokens (rsLoRA, rank/alpha patterns, a subset of layers and projections too); NoRA++
rows give the trainer's own serving model's logits; a batch mixing base, NoRA, LoRA and NoRA++
requests gives, row by row, what each gives alone; unsupported PEFT configs are refused with
clear errors and change nothing; LoRA state survives a restart over a durable store."""

from __future__ import annotations

import json
import queue
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nora_runtime.adapter import AdapterFormatError, UnsupportedAdapter
from nora_runtime.config import EngineConfig
from nora_runtime.engine import Engine, TokenEvent
from nora_runtime.lora import PROJECTIONS, pack_peft
from nora_runtime.lora_pool import LoraShapeMismatch
from nora_runtime.sampling import SamplingParams
from nora_runtime.tiny import byte_tokenizer, random_adapter

peft = pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
IDS = [[72, 101, 108, 108, 111, 32, 119], [116, 104, 101, 32, 99, 97, 116, 32], [110, 111]]
TIMEOUT = 120
SMALL = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
             tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def hf_model(checkpoint) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def save_peft(checkpoint, directory: Path, seed: int, **lora_kw) -> peft.PeftModel:
    """A PEFT LoRA of the checkpoint with random non-zero B (a fresh one is the base), saved
    with save_pretrained as PEFT writes it; returns the PeftModel."""
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJECTIONS))
    kw.update(lora_kw)
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf_model(checkpoint), peft.LoraConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return model.eval()


def make_engine(checkpoint, store, **kw) -> Engine:
    cfg = dict(model=str(checkpoint), device="cpu", block_size=4, kv_cache_tokens_cpu=1024,
               max_adapters=8, max_lora_adapters=4, max_lora_rank=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), adapter_store=store)


def engine_logits(engine: Engine, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Logits [n, V] of every position of `ids` for `adapter`, through the engine's runner and
    registry (the engine loop must not be running)."""
    hold = engine.registry.hold(adapter) if adapter else None

    class Seq:
        num_computed = 0
        block_table = list(range(-(-len(ids) // engine.runner.block_size)))
        slot = hold.slot if hold else 0

        @staticmethod
        def token_slice(a, b):
            return ids[a:b]

    try:
        batch = engine.runner.prepare([Seq], [len(ids)], [True])
        batch.sample_index = torch.arange(len(ids))
        return engine.runner.forward(batch)
    finally:
        if hold:
            hold.release()


def run(engine: Engine, requests: list[tuple]) -> list[list[int]]:
    """Submit (ids, adapter) requests at once, start the engine, return each one's tokens."""
    tokens: list[list[int]] = [[] for _ in requests]
    events: queue.SimpleQueue[tuple[int, TokenEvent]] = queue.SimpleQueue()
    for i, (ids, adapter) in enumerate(requests):
        engine.submit(ids, GREEDY, adapter=adapter, on_event=lambda e, i=i: events.put((i, e)))
    engine.start()
    pending = len(requests)
    while pending:
        i, e = events.get(timeout=TIMEOUT)
        assert e.error is None, e.error
        tokens[i] += e.token_ids
        pending -= e.finish_reason is not None
    return tokens


def peft_greedy(model, ids: list[int], n: int = GREEDY.max_new_tokens) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), max_new_tokens=n, do_sample=False,
                         eos_token_id=257, pad_token_id=258)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kw", [
    dict(),  # r = 4 on all seven projections, alpha / r
    dict(r=8, lora_alpha=4, use_rslora=True),  # alpha / sqrt(r)
    dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
         rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32}),
], ids=["all-linear", "rslora", "subset-patterns"])
def test_peft_lora_answers_as_peft_does(checkpoint, tmp_path, kw):
    store = tmp_path / "store"
    model = save_peft(checkpoint, store / "tenant-lora", seed=1, **kw)
    engine = make_engine(checkpoint, store)
    try:
        info = engine.load_adapter("la", "tenant-lora")
        assert (info.kind, info.source) == ("lora", "tenant-lora")
        want_targets = tuple(p for p in PROJECTIONS if p in model.peft_config["default"]
                             .target_modules)
        assert info.lora_targets == want_targets and info.lora_rank == kw.get("r", 4)
        for ids in IDS:
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0]
                with model.disable_adapter():
                    base = model(torch.tensor([ids])).logits[0]
            got = engine_logits(engine, "la", ids)
            assert (want - base).abs().max() > 0.05  # the adapter visibly changes the output
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(engine_logits(engine, None, ids), base, rtol=1e-4,
                                       atol=1e-4)  # and the base stays the base
        want_tokens = [peft_greedy(model, ids) for ids in IDS]
        assert run(engine, [(ids, "la") for ids in IDS]) == want_tokens
    finally:
        engine.shutdown()


def nora_pp(checkpoint, path: Path, seed: int = 3):
    """A NoRA++ adapter through the trainer's code path (NoraModel with LoRA on q and down,
    non-zero B factors, saved by NoraModel.save); returns the NoraModel."""
    from nora_runtime.training.nora import LoraSettings, NoraModel, NoraSettings

    nm = NoraModel.build(hf_model(checkpoint), NoraSettings(mode="residual"),
                         LoraSettings(targets=("q_proj", "down_proj"), rank=2, alpha=4.0),
                         seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (nm.adapter.num_B, nm.adapter.den_B):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in nm.lora.values():
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.3)
    nm.save(path)
    return nm.eval()


def test_nora_plus_plus_from_the_trainer_serves_as_trained(checkpoint, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    nm = nora_pp(checkpoint, store / "pp.safetensors")
    engine = make_engine(checkpoint, store)
    try:
        info = engine.load_adapter("pp", "pp.safetensors")
        assert (info.kind, info.lora_rank, info.lora_targets) == ("nora++", 2,
                                                                   ("q_proj", "down_proj"))
        for ids in IDS:
            with nm.serving(torch.tensor([1], dtype=torch.int32)):
                want = nm.model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(engine_logits(engine, "pp", ids), want, rtol=1e-4,
                                       atol=1e-4)
    finally:
        engine.shutdown()


def test_mixed_batch_of_base_nora_lora_and_nora_plus_plus_equals_each_alone(checkpoint,
                                                                          tmp_path):
    """Batched equals alone, row by row: 3 prompts x (base, NoRA, LoRA r=4, LoRA r=8 rsLoRA,
    NoRA++) in one continuous batch, in an interleaved order, against each request alone;
    then a batch with no LoRA row at all (the LoRA-free path) after LoRA ones."""
    store = tmp_path / "store"
    save_peft(checkpoint, store / "l4", seed=1)
    save_peft(checkpoint, store / "l8", seed=2, r=8, lora_alpha=4, use_rslora=True,
              target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    nora_pp(checkpoint, store / "pp.safetensors")
    engine = make_engine(checkpoint, store)
    try:
        engine.load_adapter("l4", "l4")
        engine.load_adapter("l8", "l8/adapter_config.json")  # either file names it too
        assert engine.load_adapter("l8", "l8/adapter_model.safetensors").kind == "lora"
        engine.load_adapter("pp", "pp.safetensors")
        from nora_runtime.adapter import adapter_to_bytes
        nora = adapter_to_bytes(random_adapter(engine.info, 5),
                                base_fingerprint=engine.info.fingerprint)
        engine.load_adapter("nora", nora)
        adapters = [None, "nora", "l4", "l8", "pp"]
        reqs = [(ids, a) for i, ids in enumerate(IDS) for a in adapters[i:] + adapters[:i]]
        mixed = run(engine, reqs)
        alone = [run(engine, [r])[0] for r in reqs]
        assert mixed == alone
        by_adapter = {a: [t for (ids, b), t in zip(reqs, alone, strict=True) if b == a]
                      for a in adapters}
        assert len({tuple(map(tuple, v)) for v in by_adapter.values()}) == len(adapters)
        want = {(tuple(ids), a): t for (ids, a), t in zip(reqs, alone, strict=True)}
        no_lora = [(ids, a) for ids in IDS for a in (None, "nora")]
        assert run(engine, no_lora) == [want[tuple(ids), a] for ids, a in no_lora]
        stats = engine.stats()
        assert (stats.lora_slots_used, stats.lora_slots_total) == (3, 4)
        kinds = {i.id: i.kind for i in engine.list_adapters()}
        assert kinds == {"l4": "lora", "l8": "lora", "pp": "nora++", "nora": "nora"}
    finally:
        engine.shutdown()


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_peft_adapters_are_refused_clearly(checkpoint, tmp_path):
    store = tmp_path / "store"
    save_peft(checkpoint, store / "ok", seed=1)
    save_peft(checkpoint, store / "dora", seed=1, use_dora=True)
    save_peft(checkpoint, store / "embed", seed=1, target_modules=["embed_tokens", "q_proj"])
    save_peft(checkpoint, store / "save", seed=1, target_modules=["q_proj"],
              modules_to_save=["lm_head"])
    save_peft(checkpoint, store / "rank16", seed=1, r=16)
    other = tmp_path / "other"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SMALL, "intermediate_size": 96})).save_pretrained(other)
    torch.manual_seed(1)
    wide = peft.get_peft_model(hf_model(other), peft.LoraConfig(r=4, target_modules=["up_proj"]))
    wide.save_pretrained(store / "shape")
    _edit_config(store / "ok", store / "bias", bias="all")
    _edit_config(store / "ok", store / "ia3", peft_type="IA3")
    engine = make_engine(checkpoint, store, max_lora_adapters=2)
    cases = {
        "dora": (UnsupportedAdapter, "DoRA"),
        "embed": (UnsupportedAdapter, "embedding"),
        "save": (UnsupportedAdapter, "modules_to_save"),
        "rank16": (UnsupportedAdapter, "rank 16 exceeds this server's max_lora_rank=8"),
        "shape": (LoraShapeMismatch, "up_proj is in=64, out=128"),
        "bias": (UnsupportedAdapter, "bias='all'"),
        "ia3": (UnsupportedAdapter, "only LORA"),
    }
    try:
        for name, (error, match) in cases.items():
            with pytest.raises(error, match=match):
                engine.load_adapter(name, name)
        lone = (store / "ok" / "adapter_model.safetensors").read_bytes()
        with pytest.raises(AdapterFormatError, match="without its adapter_config.json"):
            engine.load_adapter("lone", lone)
        assert engine.registry.load_failures == len(cases) + 1 and not engine.list_adapters()
        assert engine.stats().lora_slots_used == 0
        # packed bytes of the same directory load (inline too), under one content id
        packed = pack_peft(store / "ok")
        assert engine.load_adapter("packed", packed).kind == "lora"
        with engine.hold_adapter(packed) as hold:
            assert engine.registry.get(hold.id).kind == "lora"
        engine_off = make_engine(checkpoint, None, max_lora_adapters=0)
        with pytest.raises(UnsupportedAdapter, match="no LoRA pool"):
            engine_off.load_adapter("packed", packed)
    finally:
        engine.shutdown()


def test_lora_adapters_survive_a_restart(checkpoint, tmp_path):
    store = tmp_path / "store"
    save_peft(checkpoint, store / "a", seed=1)
    nora_pp(checkpoint, store / "pp.safetensors")
    first = make_engine(checkpoint, store)
    first.load_adapter("la", "a")
    want = {i: engine_logits(first, i, IDS[0]) for i in ("la", "pp")}  # pp: restored file
    shutil.rmtree(store / "a")  # the store keeps its own packed copy
    second = make_engine(checkpoint, store)
    assert set(second.restored_adapters) == {"la", "pp"}
    assert {i.id: i.kind for i in second.list_adapters()} == {"la": "lora", "pp": "nora++"}
    for adapter_id, logits in want.items():
        torch.testing.assert_close(engine_logits(second, adapter_id, IDS[0]), logits)
