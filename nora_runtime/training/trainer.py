"""`train(TrainConfig)`: JSONL data + a base model -> a NoRA (or NoRA++) adapter file.

The base model is a transformers checkpoint (a directory or hub id; None = the built-in demo
model, as the server's EngineConfig.model = None): a causal LM for language-model data, or a
model with a sequence-classification head for {"text", "label"} data. Its MLP activations are
converted exactly as the server converts them, so the adapter trained here is what it serves.

Output directory:

    adapter.safetensors        the adapter (nora_runtime.adapter format; NoRA++: + LoRA part)
    adapter.head.safetensors   classification only: the trained head (the adapter file holds
                               only what the server applies; the head belongs to the label set)
    history.json, loss.png     losses per step and per eval
    train_config.json          the settings, the base fingerprint, parameter counts, labels
    checkpoint.pt              with save_every: what `resume` continues from
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from nora_runtime.training import data as D
from nora_runtime.training.loop import LoopSettings, fit, save_history
from nora_runtime.training.nora import LoraSettings, NoraModel, NoraSettings

TASKS = ("auto", "causal_lm", "classification")
ADAPTER_FILE = "adapter.safetensors"
HEAD_NAMES = ("classifier", "score")  # the classification heads of BERT/ViT and Llama-likes


@dataclass(frozen=True)
class TrainConfig:
    """A training run. data: JSONL path (nora_runtime.training.data); eval_data: a second
    JSONL for eval, else `eval_fraction` of data is held out (0: no eval, no early stopping)."""

    data: str
    out: str = "nora-out"
    model: str | None = None  # checkpoint directory, hub id or .gguf; None = the default model
    task: str = "auto"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    max_length: int = 512
    train_head: bool = True  # classification: train the head (new label set) in full
    device: str = "auto"
    dtype: str = "float32"  # base weights; with bf16 autocast on GPU the math runs in bf16
    plot: bool = True  # loss.png (needs matplotlib)
    resume: bool = False
    nora: NoraSettings = field(default_factory=NoraSettings)
    lora: LoraSettings | None = None  # NoRA++ when set
    loop: LoopSettings = field(default_factory=LoopSettings)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass
class TrainResult:
    adapter: Path
    history: object  # loop.History
    trainable: int  # parameters training changed
    base_parameters: int  # parameters of the base model
    fingerprint: str
    model: NoraModel = field(repr=False)


def load_base(cfg: TrainConfig, task: str, num_labels: int | None = None):
    """(model, tokenizer) of cfg.model on cfg.device."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from nora_runtime.checkpoint import resolve_checkpoint

    path = str(resolve_checkpoint(cfg.model))
    tok = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, cfg.dtype)
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype,
                                                                   num_labels=num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok.pad_token_id is None:  # padding is masked; any id will do (transformers 5.17 reads
        tok.pad_token = tok.eos_token  # no pad token from the converted SmolLM2 tokenizer)
    model.config.pad_token_id = tok.pad_token_id  # a Llama classifier pools the last non-pad
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    return model.to("cpu" if device == "auto" else device), tok


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run `cfg`; `log` (e.g. print) gets a line per eval, the first at step 0 (the base)."""
    out = Path(cfg.out)
    if cfg.plot:
        from nora_runtime.training.plots import pyplot

        pyplot()  # fail now, not after training, if matplotlib is missing
    records = D.read_jsonl(cfg.data)
    task = D.task_of(records) if cfg.task == "auto" else cfg.task
    eval_records = D.read_jsonl(cfg.eval_data) if cfg.eval_data else None
    label2id = D.label_ids(records + (eval_records or [])) if task == "classification" else None
    torch.manual_seed(cfg.loop.seed)  # a new head's init
    num_labels = None if label2id is None else max(label2id.values()) + 1
    model, tok = load_base(cfg, task, num_labels)

    def encode(r: dict) -> D.Example:
        if task == "classification":
            return D.encode_classification(r, tok, label2id, cfg.max_length)
        return D.encode_causal(r, tok, cfg.max_length)

    if eval_records is None:
        train_recs, eval_recs = D.split(records, cfg.eval_fraction, cfg.loop.seed)
    else:
        train_recs, eval_recs = records, eval_records
    train_set, eval_set = [encode(r) for r in train_recs], [encode(r) for r in eval_recs]

    head = ()
    if task == "classification" and cfg.train_head:
        head = tuple(n for n in HEAD_NAMES if hasattr(model, n))[:1]
        if not head:
            raise ValueError(f"{type(model).__name__} has no head module named {HEAD_NAMES}")
    base_params = sum(p.numel() for p in model.parameters())
    nm = NoraModel.build(model, cfg.nora, cfg.lora, head=head, seed=cfg.loop.seed)
    out.mkdir(parents=True, exist_ok=True)

    def on_eval(step: int, loss: float, acc: float | None) -> None:
        if log is not None:
            what = " (before training: the base)" if step == 0 else ""
            log(f"step {step}: eval loss {loss:.4f}"
                + ("" if acc is None else f", accuracy {acc:.4f}") + what)

    hist = fit(nm, train_set, eval_set, partial(D.collate, pad_id=tok.pad_token_id), cfg.loop,
               out_dir=out, resume=cfg.resume, on_eval=on_eval)

    adapter = out / ADAPTER_FILE
    nm.save(adapter)
    save_history(hist, out / "history.json")
    summary = {"config": asdict(cfg), "task": task, "fingerprint": nm.fingerprint,
               "trainable_parameters": nm.num_trainable(), "base_parameters": base_params,
               "train_examples": len(train_set), "eval_examples": len(eval_set),
               "labels": None if label2id is None else {str(k): v for k, v in label2id.items()}}
    (out / "train_config.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if cfg.plot:
        from nora_runtime.training.plots import loss_curve

        kind = "NoRA++" if cfg.lora else "NoRA"
        loss_curve(hist.train, hist.eval, out / "loss.png",
                   title=f"{kind}: {nm.num_trainable():,} trainable parameters")
    return TrainResult(adapter, hist, nm.num_trainable(), base_params, nm.fingerprint, nm)
