"""The training loop: any module whose forward(**batch) returns `.logits`, its trainable
parameters, a list of examples and a collate function.

    for each optimizer step: `grad_accum` micro-batches, loss = sum of token (or example) losses
    / their total count, so accumulation gives the same gradient as one big batch; clip; step.

Reproducible: the data order of epoch e is a permutation seeded by (seed, e), and the global
RNG is seeded once and saved in checkpoints, so a run resumed from a checkpoint ends with the
same weights as an uninterrupted one. Early stopping watches the eval loss; at the end the
module holds the parameters of the best eval (the last step without eval data).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nora_runtime.training.data import IGNORE

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class LoopSettings:
    """Optimizer, schedule and bookkeeping of one training run."""

    # Measured with these defaults (batch 8, AdamW, cosine, clip 1.0) on the default model,
    # SmolLM2-135M-Instruct, NoRA G=8 r=3 in residual mode, 24 steps of the sign-off demo data
    # (eval loss at step 0: 2.095): lr 1e-3 -> eval 1.203, 2e-3 -> 1.190 (train loss falls
    # from the first step), 3e-3 -> 1.257 (train loss first rises, 2.03 -> 2.46), 5e-3 -> 1.430
    # (train loss 2.03 -> 4.26 after one step; the old default).
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"  # after warmup: to 0 (cosine, linear) or flat (constant)
    warmup_steps: int = 0
    epochs: int = 3
    max_steps: int | None = None  # caps epochs * steps per epoch
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int = 50  # optimizer steps between evals (and one at the end)
    eval_batch_size: int = 32
    patience: int | None = None  # early stop after this many evals without improvement
    min_delta: float = 0.0  # an eval loss must beat the best by more than this
    save_every: int | None = None  # optimizer steps between checkpoints (needs out_dir)
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on the CPU)
    seed: int = 0
    progress: bool = True  # a tqdm progress bar

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "patience", "save_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("need lr > 0, warmup_steps >= 0 and weight_decay >= 0")


@dataclass
class History:
    """Per optimizer step: train loss; per eval: (step, eval loss, eval accuracy)."""

    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float, float | None]] = field(default_factory=list)
    best_step: int | None = None
    best_eval: float | None = None
    stopped_early: bool = False
    steps: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of losses, count): next-token cross entropy over labelled positions for [B, S, V]
    logits and [B, S] labels; class cross entropy for [B, K] logits and [B] labels."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def steps_per_epoch(n: int, s: LoopSettings) -> int:
    return math.ceil(math.ceil(n / s.batch_size) / s.grad_accum)


def epoch_steps(n: int, epoch: int, s: LoopSettings) -> list[list[list[int]]]:
    """Example indices of epoch `epoch`: steps -> micro-batches -> indices."""
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    micro = [order[i:i + s.batch_size] for i in range(0, n, s.batch_size)]
    return [micro[i:i + s.grad_accum] for i in range(0, len(micro), s.grad_accum)]


def lr_factor(step: int, total: int, s: LoopSettings) -> float:
    if step < s.warmup_steps:
        return (step + 1) / (s.warmup_steps + 1)
    if s.schedule == "constant":
        return 1.0
    t = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * t)) if s.schedule == "cosine" else 1.0 - t


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


@torch.no_grad()
def evaluate(module: nn.Module, examples: list, collate: Callable, s: LoopSettings,
             device: torch.device) -> tuple[float, float | None]:
    """(mean loss, accuracy) over `examples`; accuracy only for classification ([B, K])."""
    was_training = module.training
    module.eval()
    total, count, correct, n_cls = 0.0, 0, 0, 0
    for i in range(0, len(examples), s.eval_batch_size):
        batch = to_device(collate(examples[i:i + s.eval_batch_size]), device)
        with autocast(device, s.bf16):
            logits = module(**without_labels(batch)).logits
        loss, n = loss_sum(logits, batch["labels"])
        total, count = total + loss.item(), count + n
        if logits.dim() == 2:
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n_cls += len(batch["labels"])
    module.train(was_training)
    return total / max(count, 1), (correct / n_cls if n_cls else None)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=bf16 and device.type == "cuda")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # the loss is computed here (loss_sum), not by the model: exact sums for accumulation
    return {k: v for k, v in batch.items() if k != "labels"}


def fit(module: nn.Module, train: list, eval_set: list, collate: Callable, s: LoopSettings, *,
        out_dir: str | Path | None = None, resume: bool = False,
        on_step: Callable[[int, float], None] | None = None,
        on_eval: Callable[[int, float, float | None], None] | None = None) -> History:
    """Train the parameters of `module` that require grad. out_dir: where checkpoints go
    (save_every) and whence `resume` continues. on_step(step, loss) runs after each step,
    on_eval(step, loss, accuracy) after each eval.

    With eval data, the first eval is at step 0, before any update: the baseline (for an
    adapter, the base model's loss) that training has to beat. Early stopping counts from it,
    so a run that never improves ends with the module as it started."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters")
    device = params[0].device
    torch.manual_seed(s.seed)
    opt = (torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
           if s.optimizer == "adamw" else
           torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay))
    spe = steps_per_epoch(len(train), s)
    total = spe * s.epochs if s.max_steps is None else min(spe * s.epochs, s.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, total, s))
    hist, best_state, bad_evals, step = History(), None, 0, 0
    ckpt = None if out_dir is None else Path(out_dir) / CHECKPOINT
    if resume:
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"no checkpoint to resume from in {out_dir}")
        c = torch.load(ckpt, weights_only=False)
        load_trainable(module, c["params"])
        opt.load_state_dict(c["optimizer"])
        sched.load_state_dict(c["scheduler"])
        torch.set_rng_state(c["rng"])
        if c["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(c["cuda_rng"])
        hist, best_state, bad_evals, step = History(**c["history"]), c["best"], c["bad"], c["step"]
        hist.eval = [tuple(e) for e in hist.eval]
        hist.train = [tuple(t) for t in hist.train]

    def save_checkpoint() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"params": trainable_state(module), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": cuda_rng, "history": hist.to_json(), "best": best_state,
                    "bad": bad_evals, "step": step}, tmp)
        tmp.replace(ckpt)  # a crash mid-write keeps the previous checkpoint

    def run_eval() -> bool:
        """Eval now; True when early stopping says stop."""
        nonlocal best_state, bad_evals
        loss, acc = evaluate(module, eval_set, collate, s, device)
        hist.eval.append((step, loss, acc))
        if hist.best_eval is None or loss < hist.best_eval - s.min_delta:
            hist.best_step, hist.best_eval, bad_evals = step, loss, 0
            best_state = trainable_state(module)
        else:
            bad_evals += 1
        if on_eval is not None:
            on_eval(step, loss, acc)
        return s.patience is not None and bad_evals >= s.patience

    t0 = time.perf_counter() - hist.seconds
    if eval_set and step == 0 and not hist.eval:
        run_eval()  # the baseline
        hist.seconds = time.perf_counter() - t0
    bar = progress_bar(total, step, s.progress)
    module.train()
    stop = False
    while step < total and not stop:
        epoch, k = divmod(step, spe)
        micro = epoch_steps(len(train), epoch, s)[k]
        batches = [collate([train[i] for i in idx]) for idx in micro]
        n_total = sum(count_targets(b["labels"]) for b in batches)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for b in batches:
            b = to_device(b, device)
            with autocast(device, s.bf16):
                logits = module(**without_labels(b)).logits
            loss, _ = loss_sum(logits, b["labels"])
            (loss / max(n_total, 1)).backward()
            step_loss += loss.item() / max(n_total, 1)
        if s.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        hist.train.append((step, step_loss))
        if eval_set and (step % s.eval_every == 0 or step == total):
            stop = run_eval()
            hist.stopped_early = stop and step < total
        hist.steps, hist.seconds = step, time.perf_counter() - t0
        if ckpt is not None and s.save_every and (step % s.save_every == 0 or step == total
                                                  or stop):
            save_checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", **({"eval": f"{hist.eval[-1][1]:.4f}"}
                                                    if hist.eval else {}))
        if on_step is not None:
            on_step(step, step_loss)
    bar.close()
    if best_state is not None:
        load_trainable(module, best_state)
    return hist


def count_targets(labels: torch.Tensor) -> int:
    """Loss terms in a batch: labelled next-token positions, or examples."""
    if labels.dim() == 2:
        return int((labels[:, 1:] != IGNORE).sum())
    return labels.numel()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # a dependency of transformers' hub client, but be clear
        raise ImportError("the progress bar needs tqdm: pip install 'nora[train]' (or turn "
                          "the progress bar off)") from e
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def save_history(hist: History, path: str | Path) -> None:
    Path(path).write_text(json.dumps(hist.to_json(), indent=1) + "\n")
