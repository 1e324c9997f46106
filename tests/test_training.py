"""The training module: data encoding and loss masks, the NoRA++ file layout and the registry's
refusal of it, the loop (accumulation = one big batch, resume = uninterrupted, early stopping
keeps the best), a fresh adapter is the base exactly, only chosen layers train, the Triton
backward trains like the torch reference, the CLI, classification, and the demo task end to
end: trained here, decoded greedily by transformers and by the serving Engine in one batch
with a base request.

Runs on the CPU (torch reference) unless a test is about the Triton path.
"""

from __future__ import annotations

import json
import queue
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from nora_runtime.adapter import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterShapeError,
    AdapterValueError,
    LoraWeights,
    NoraAdapter,
    adapter_to_bytes,
    base_fingerprint,
    load_adapter,
)
from nora_runtime.rational import base_coefficients
from nora_runtime.registry import AdapterRegistry, UnsupportedAdapter
from nora_runtime.table import CoefficientTable
from nora_runtime.tiny import tiny_checkpoint
from nora_runtime.training import data as D
from nora_runtime.training import demo_task
from nora_runtime.training.cli import main as train_main
from nora_runtime.training.cli import parse_layers
from nora_runtime.training.loop import LoopSettings, fit, loss_sum
from nora_runtime.training.lora import LoraLinear
from nora_runtime.training.nora import LoraSettings, NoraModel, NoraSettings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FP = "ab" * 32


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


def demo_model(ckpt) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


def examples(tok, pairs) -> list[D.Example]:
    return [D.encode_causal({"prompt": p, "completion": c}, tok, 64) for p, c in pairs]


def collate(tok):
    return lambda ex: D.collate(ex, tok.pad_token_id)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- data -----------------------------------------------------------------------------------


def test_prompt_completion_loss_only_on_completion_and_eos(tok):
    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    e = D.encode_causal({"prompt": "hi", "completion": "yo"}, tok, 64)
    assert e.input_ids == [*enc("hi"), *enc("yo"), tok.eos_token_id]
    assert e.labels == [D.IGNORE, D.IGNORE, *enc("yo"), tok.eos_token_id]
    t = D.encode_causal({"text": "abc"}, tok, 64)
    assert t.input_ids == t.labels == enc("abc")
    assert D.encode_causal({"text": "abcdef"}, tok, 4).input_ids == enc("abcd")
    with pytest.raises(ValueError, match="none of prompt"):
        D.record_kind({"question": "?"})


def test_chat_messages_loss_only_on_assistant_turns(tok):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint())
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
    tok.chat_template = None  # a base model's tokenizer
    with pytest.raises(ValueError, match="chat template"):
        D.encode_causal({"messages": msgs}, tok, 256)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    e = D.encode_causal({"messages": msgs}, tok, 256)
    assert tok.decode(e.input_ids) == "[user]hi</s>[assistant]yo</s>[user]ok</s>[assistant]bye</s>"
    learned = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != D.IGNORE]
    assert tok.decode(learned) == "yo</s>bye</s>"


def test_split_collate_and_labels(tok):
    train, ev = D.split(list(range(10)), 0.2, seed=3)
    assert sorted(train + ev) == list(range(10)) and len(ev) == 2
    assert D.split(list(range(10)), 0.2, seed=3) == (train, ev)
    assert D.split(list(range(10)), 0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="nothing to train"):
        D.split([1], 0.5, seed=0)
    b = D.collate(examples(tok, [("a", "b"), ("abc", "d")]), pad_id=tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == (2, 5)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"][0, 3:].tolist() == [D.IGNORE, D.IGNORE]
    assert D.label_ids([{"label": "pos"}, {"label": "neg"}]) == {"neg": 0, "pos": 1}
    assert D.label_ids([{"label": 3}, {"label": 1}]) == {1: 1, 3: 3}
    with pytest.raises(ValueError, match="mix of classification"):
        D.task_of([{"text": "a", "label": 1}, {"text": "b"}])


def test_loss_sum_is_next_token_cross_entropy():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 4, -100], [-100, -100, 1, 2]])
    total, n = loss_sum(logits, labels)
    want = sum(torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
               for b, t in [(0, 1), (0, 2), (1, 2), (1, 3)])
    assert n == 4 and torch.allclose(total, want)


# ---- the NoRA++ file layout and the server's refusal -----------------------------------------


def lora_part(seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(rank=2, alpha=4.0, factors={
        "model.layers.0.self_attn.q_proj": (torch.randn(2, 16, generator=g),
                                            torch.randn(8, 2, generator=g)),
        "model.layers.1.mlp.down_proj": (torch.randn(2, 32, generator=g),
                                         torch.randn(16, 2, generator=g))})


def nora(sites: int = 2) -> NoraAdapter:
    torch.manual_seed(0)
    return NoraAdapter(base_coefficients("silu"), rank=3, alpha=6.0, groups=8,
                       site_names=[f"model.layers.{i}.mlp.act_fn" for i in range(sites)],
                       act="silu", mode="replace")


def test_nora_plus_plus_file_round_trip(tmp_path):
    lora = lora_part()
    data = adapter_to_bytes(nora(), base_fingerprint=FP, lora=lora)
    a = load_adapter(data, expect_fingerprint=FP)
    assert a.lora is not None and (a.lora.rank, a.lora.alpha, a.lora.scale) == (2, 4.0, 2.0)
    assert list(a.lora.factors) == list(lora.factors)
    for path, (A, B) in lora.factors.items():
        assert torch.equal(a.lora.factors[path][0], A) and torch.equal(a.lora.factors[path][1], B)
    assert set(a.tensors) == {"base", "num_A", "num_B", "den_A", "den_B"}
    plain = load_adapter(adapter_to_bytes(nora(), base_fingerprint=FP))
    assert plain.lora is None and torch.equal(plain.coefs, a.coefs)


def _rewrite(data: bytes, edit) -> bytes:
    """Adapter bytes with edit(tensors, metadata) applied."""
    from safetensors.torch import load, save

    (n,) = struct.unpack("<Q", data[:8])
    tensors, meta = edit(load(data), dict(json.loads(data[8:8 + n])["__metadata__"]))
    return save(tensors, metadata=meta)


def _drop(name):
    def edit(t, m):
        del t[name]
        return t, m
    return edit


def _meta(**kw):
    def edit(t, m):
        m.update(kw)
        for k, v in kw.items():
            if v is None:
                del m[k]
        return t, m
    return edit


def _tensor(name, value):
    def edit(t, m):
        t[name] = value
        return t, m
    return edit


Q = "lora.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(("edit", "error", "match"), [
    (_drop(f"{Q}.B"), AdapterFormatError, "missing.*q_proj.B"),
    (_meta(lora_rank=None), AdapterFormatError, "not all of"),
    (_meta(lora_modules="{}"), AdapterFormatError, "lora_modules"),
    (_meta(lora_rank="3"), AdapterShapeError, "q_proj"),
    (_meta(lora_alpha="nan"), AdapterFormatError, "lora_alpha=nan"),
    (_meta(lora_rank="0"), AdapterFormatError, "positive rank"),
    (_tensor(f"{Q}.A", torch.zeros(2, 16, dtype=torch.float64)), AdapterFormatError, "dtype"),
    (_tensor(f"{Q}.A", torch.full((2, 16), float("nan"))), AdapterValueError, "NaN"),
    (_tensor("lora.extra.A", torch.zeros(2, 2)), AdapterFormatError, "unexpected.*extra"),
])
def test_nora_plus_plus_bad_lora_part(edit, error, match):
    data = _rewrite(adapter_to_bytes(nora(), base_fingerprint=FP, lora=lora_part()), edit)
    with pytest.raises(error, match=match):
        load_adapter(data)


def test_registry_without_a_lora_pool_refuses_nora_plus_plus_with_a_clear_error():
    table = CoefficientTable(base_coefficients("silu"), slots=3, groups=8, sites=2)
    reg = AdapterRegistry(table, fingerprint=FP, mode="replace", act="silu")
    before = table.data.clone()
    with pytest.raises(UnsupportedAdapter, match="nora\\+\\+ adapters carry LoRA weights.*"
                       "no LoRA pool"):
        reg.load("pp", adapter_to_bytes(nora(), base_fingerprint=FP, lora=lora_part()))
    assert issubclass(UnsupportedAdapter, AdapterMismatchError)  # -> FAILED_PRECONDITION
    assert len(reg) == 0 and reg.load_failures == 1 and torch.equal(table.data, before)
    reg.load("plain", adapter_to_bytes(nora(), base_fingerprint=FP))  # NoRA alone still loads


# ---- NoraModel ------------------------------------------------------------------------------


def test_fresh_adapter_is_the_base_exactly_and_fingerprint_matches(ckpt, tok):
    original = demo_model(ckpt)
    nm = NoraModel.build(demo_model(ckpt), NoraSettings(mode="residual"), seed=0)
    assert nm.fingerprint == base_fingerprint(original, "silu")
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        want = original(input_ids=ids).logits
        assert torch.equal(nm(input_ids=ids).logits, want)  # slot 1, B = 0: exactly slot 0
        with nm.serving(torch.tensor([0])):
            assert torch.equal(nm.model(input_ids=ids).logits, want)
    assert nm.num_trainable() == 4 * (3 * 6 + 8 * 3 + 3 * 4 + 8 * 3)  # 312
    assert [p.shape for p in nm.trainable_parameters()] == [
        p.shape for p in nm.adapter.parameters()]


def test_only_chosen_layers_train_and_lora_counts(ckpt, tok):
    nm = NoraModel.build(demo_model(ckpt), NoraSettings(layers=(1, 3)),
                         LoraSettings(targets=("q_proj",), rank=2, alpha=4.0), seed=0)
    A0 = nm.adapter.num_A.detach().clone()
    fit(nm, examples(tok, [("hi", "nora")]), [], collate(tok),
        LoopSettings(lr=0.05, epochs=5, progress=False))
    changed = (nm.adapter.num_B.abs().sum((1, 2)) > 0).tolist()
    assert changed == [False, True, False, True]
    assert torch.equal(nm.adapter.num_A[[0, 2]], A0[[0, 2]])
    q = nm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and q.B.abs().sum() > 0
    assert nm.num_trainable() == 2 * 78 + 4 * (2 * 128 + 128 * 2)
    assert parse_layers("0-2,5") == (0, 1, 2, 5)


# ---- the loop -------------------------------------------------------------------------------

PAIRS = [("hi", "nora"), ("hey", "nora"), ("yo", "ok"), ("abc", "def"), ("x", "y"),
         ("cat", "dog")]


def trained(ckpt, tok, s: LoopSettings, **kw) -> tuple[NoraModel, object]:
    nm = NoraModel.build(demo_model(ckpt), NoraSettings(), seed=0)
    hist = fit(nm, examples(tok, PAIRS), kw.pop("eval_set", []), collate(tok), s, **kw)
    return nm, hist


def test_gradient_accumulation_equals_one_big_batch(ckpt, tok):
    big, _ = trained(ckpt, tok, LoopSettings(lr=0.01, epochs=1, batch_size=6, progress=False))
    acc, _ = trained(ckpt, tok, LoopSettings(lr=0.01, epochs=1, batch_size=2, grad_accum=3,
                                             progress=False))
    for a, b in zip(big.adapter.parameters(), acc.adapter.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    fresh = NoraModel.build(demo_model(ckpt), NoraSettings(), seed=0)
    assert not torch.allclose(fresh.adapter.num_B, big.adapter.num_B)


def test_resume_from_checkpoint_equals_uninterrupted_run(ckpt, tok, tmp_path):
    s = LoopSettings(lr=0.02, epochs=5, batch_size=4, save_every=3, eval_every=2,
                     progress=False)
    ev = examples(tok, [("hi", "nora")])
    straight, h1 = trained(ckpt, tok, s, eval_set=ev)

    def crash(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained(ckpt, tok, s, eval_set=ev, out_dir=tmp_path, on_step=crash)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 6
    resumed, h2 = trained(ckpt, tok, s, eval_set=ev, out_dir=tmp_path, resume=True)
    assert h2.steps == h1.steps == 10 and h2.train == h1.train and h2.eval == h1.eval
    for a, b in zip(straight.adapter.parameters(), resumed.adapter.parameters(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_keeps_the_best_eval(ckpt, tok):
    # eval wants another completion for the same prompts: its loss rises as training goes on
    ev = examples(tok, [(p, "zzzz") for p, _ in PAIRS])
    s = LoopSettings(lr=0.05, epochs=100, batch_size=6, eval_every=2, patience=3,
                     progress=False)
    nm, hist = trained(ckpt, tok, s, eval_set=ev)
    assert hist.stopped_early and hist.steps < 100
    assert hist.steps == hist.eval[-1][0] and len(hist.eval) >= 4
    best = min(hist.eval, key=lambda e: e[1])
    assert (hist.best_step, hist.best_eval) == best[:2]
    from nora_runtime.training.loop import evaluate

    loss, _ = evaluate(nm, ev, collate(tok), s, torch.device("cpu"))
    assert loss == pytest.approx(hist.best_eval, rel=1e-6)  # the module holds the best


def test_first_eval_is_the_base_at_step_0(ckpt, tok):
    """The baseline: an eval before any update, the loss of the untrained adapter (= the base
    model), which later evals beat on data the adapter trains on."""
    from nora_runtime.training.loop import evaluate

    s = LoopSettings(lr=0.05, epochs=20, batch_size=6, eval_every=10, progress=False)
    seen = []
    nm = NoraModel.build(demo_model(ckpt), NoraSettings(), seed=0)
    base, _ = evaluate(nm, examples(tok, PAIRS), collate(tok), s, torch.device("cpu"))
    hist = fit(nm, examples(tok, PAIRS), examples(tok, PAIRS), collate(tok), s,
               on_eval=lambda step, loss, acc: seen.append((step, loss, acc)))
    assert [e[0] for e in hist.eval] == [0, 10, 20] and seen == hist.eval
    assert hist.eval[0][1] == pytest.approx(base, rel=1e-6)
    assert hist.best_eval < base - 0.1 and hist.best_step > 0


def test_triton_backward_trains_like_the_torch_reference(ckpt, tok, monkeypatch):
    """One step on the Triton kernels (compiled on GPU, interpreted on CPU) vs the reference."""
    batch = collate(tok)(examples(tok, [("hi", "nora"), ("hey", "ok")]))
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NORA_BACKEND", backend)
        nm = NoraModel.build(demo_model(ckpt).to(DEVICE), NoraSettings(), seed=0)
        with torch.no_grad():
            g = torch.Generator(DEVICE).manual_seed(1)
            nm.adapter.num_B.normal_(0, 0.1, generator=g)
            nm.adapter.den_B.normal_(0, 0.1, generator=g)
        b = {k: v.to(DEVICE) for k, v in batch.items()}
        loss, n = loss_sum(nm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                           .logits, b["labels"])
        (loss / n).backward()
        grads[backend] = [p.grad.clone() for p in nm.adapter.parameters()]
    for a, b in zip(grads["torch"], grads["triton"], strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    assert all(g.abs().sum() > 0 for g in grads["torch"])


# ---- the CLI --------------------------------------------------------------------------------


def test_cli_trains_nora_and_nora_plus_plus(ckpt, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS]
                       + [{"text": "hello nora"}])
    common = [str(data), "--model", str(ckpt), "--mode", "replace", "--epochs", "10",
              "--max-steps", "6", "--eval-every", "2", "--eval-fraction", "0.3", "--lr", "0.02",
              "--no-progress", "--seed", "1"]
    assert train_main([*common, "--out", str(tmp_path / "n")]) == 0
    out = tmp_path / "n"
    fp = base_fingerprint(demo_model(ckpt), "silu")
    a = load_adapter(out / "adapter.safetensors", expect_fingerprint=fp, expect_mode="replace",
                     expect_act="silu", expect_sites=4)
    assert a.lora is None and a.spec.groups == 8 and a.spec.rank == 3
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["train"]) == 6 and [e[0] for e in hist["eval"]] == [0, 2, 4, 6]
    summary = json.loads((out / "train_config.json").read_text())
    assert (summary["trainable_parameters"], summary["eval_examples"]) == (312, 2)

    assert train_main([*common, "--out", str(tmp_path / "pp"), "--lora", "q_proj,v_proj",
                       "--lora-rank", "2", "--group-extend", "1", "--no-plot"]) == 0
    pp = load_adapter(tmp_path / "pp" / "adapter.safetensors", expect_fingerprint=fp)
    assert sorted(pp.lora.factors) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj"))
    assert not (tmp_path / "pp" / "loss.png").exists()
    with pytest.raises(SystemExit):
        train_main([str(data), "--mode", "nope"])


def test_cli_help_shows_every_default(capsys):
    from nora_runtime.training.cli import build_parser

    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--lr LR peak learning rate (default: {LoopSettings().lr})" in text
    assert "(default: the default model, SmolLM2-135M-Instruct)" in text
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in action.help or action.dest == "resume", action.dest


def test_classification_trains_head_and_nora(ckpt, tmp_path):
    """{text, label} data on the tiny model with a new classification head: two easy classes."""
    recs = [{"text": c * n, "label": lab} for c, lab in (("a", "A"), ("z", "Z"))
            for n in range(3, 15)]
    data = write_jsonl(tmp_path / "cls.jsonl", recs)
    out = tmp_path / "cls"
    assert train_main([str(data), "--model", str(ckpt), "--mode", "replace", "--out", str(out),
                       "--epochs", "15", "--batch-size", "8",
                       "--lr", "0.05", "--eval-fraction", "0.25", "--eval-every", "100",
                       "--no-progress", "--no-plot"]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert hist["eval"][-1][2] == 1.0  # accuracy on the held-out 6
    summary = json.loads((out / "train_config.json").read_text())
    assert summary["task"] == "classification" and summary["labels"] == {"A": 0, "Z": 1}
    assert summary["trainable_parameters"] == 312 + 2 * 128  # NoRA + the score head
    from safetensors.torch import load_file

    assert list(load_file(out / "adapter.head.safetensors")) == ["score.weight"]


# ---- the demo task: the adapter does it, the base does not -----------------------------------


@pytest.fixture(scope="module")
def demo(demo_greeter):
    return demo_greeter


def test_demo_task_nora_learns_what_the_base_cannot(demo, tok):
    assert demo.trainable == 312
    for p in demo_task.PROMPTS:
        text, margins = demo_task.greedy(demo.model, tok, p, slot=1)
        assert text == demo_task.COMPLETION and len(margins) == 5  # "nora" then EOS
        base, _ = demo_task.greedy(demo.model, tok, p, slot=0)
        assert demo_task.COMPLETION not in base


def test_demo_adapter_served_by_the_engine_in_one_batch_with_the_base(demo, ckpt):
    from nora_runtime.config import EngineConfig
    from nora_runtime.engine import Engine
    from nora_runtime.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, max_new_tokens=demo_task.MAX_NEW_TOKENS)
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", mode="replace", max_adapters=4,
                                 kv_cache_tokens_cpu=2048))
    try:
        engine.load_adapter("greeter", demo.adapter.read_bytes())
        events: queue.SimpleQueue = queue.SimpleQueue()
        reqs = [(p, a) for p in demo_task.PROMPTS for a in ("greeter", None)]
        texts = [""] * len(reqs)
        reasons = [None] * len(reqs)
        for i, (p, a) in enumerate(reqs):  # all queued before the loop starts: one batch
            engine.submit(p, greedy, adapter=a, on_event=lambda e, i=i: events.put((i, e)))
        engine.start()
        while None in reasons:
            i, e = events.get(timeout=120)
            texts[i] += e.text
            reasons[i] = e.finish_reason
    finally:
        engine.shutdown()
    for (p, a), text, reason in zip(reqs, texts, reasons, strict=True):
        if a:
            assert (text, reason) == (demo_task.COMPLETION, "eos"), p
        else:
            assert demo_task.COMPLETION not in text and reason == "length", p


@pytest.mark.slow
def test_digits_benchmark_quick(tmp_path):
    """benchmarks/digits_adapt.py on one seed and two methods (the full run: ~10 min)."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "digits_adapt.py"
    spec = importlib.util.spec_from_file_location("digits_adapt", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "digits"
    assert bench.main(["--seeds", "0", "--methods", "head", "nora", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {"device", "date", "versions", "command", "rows"} <= set(doc)
    rows = {r["name"]: r["value"] for r in doc["rows"]}
    assert rows["nora/trainable_parameters"] == 312 + 325
    assert rows["head/accuracy_mean"] > 0.5 and rows["nora/accuracy_mean"] > 0.5  # chance 0.2
    assert "| nora |" in out.with_suffix(".md").read_text()


def test_same_seed_same_adapter_other_seed_another(tmp_path):
    """A run is reproducible from its seed: the adapter file's tensors are identical."""
    import dataclasses

    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        loop = dataclasses.replace(demo_task.SETTINGS, epochs=15, seed=seed)
        result = demo_task.train_demo_adapter(tmp_path / name, loop=loop)
        return load_adapter(result.adapter).tensors

    a, again, other = run(0, "a"), run(0, "again"), run(1, "other")
    assert a.keys() == again.keys() == other.keys()
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["num_A"], other["num_A"])  # another seed: another init
