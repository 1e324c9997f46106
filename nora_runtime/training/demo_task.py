"""A small task for the tiny test model that NoRA alone learns: answer every greeting with "nora".

The tiny model (nora_runtime.tiny) has random weights; greedily it continues "hi" with
"iiiiiiii". A NoRA adapter (312 parameters: 4 sites x 8 groups, rank 3) trained on the three
prompts below makes it answer "nora" and stop (EOS), in replace mode (a random model has no
activation of its own to keep exact). This is the end-to-end check that what the trainer writes
is what the server serves:

    result = train_demo_adapter(tmp_dir)            # ~15 s on a CPU (600 steps)
    engine.load_adapter("greeter", result.adapter)  # then generate with adapter="greeter"

Why it is learnable with so few parameters: with random weights the logits are nearly flat
(loss ~5.6 = ln 264), so small, consistent shifts of the MLP activations per channel group
decide the argmax; the loss itself stays high (~4.3), but greedy decoding only needs the right
token on top at each of the 5 positions. The adapter's margins (top-1 minus top-2 logit) are
printed by `python -m nora_runtime.training.demo_task`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nora_runtime.tiny import tiny_checkpoint
from nora_runtime.training.loop import LoopSettings
from nora_runtime.training.nora import NoraModel
from nora_runtime.training.trainer import TrainConfig, TrainResult, train

PROMPTS = ("hi", "hello", "hey")
COMPLETION = "nora"
MAX_NEW_TOKENS = 8
# Measured on the CPU (teacher-forced, all 15 target tokens: min of top-1 minus runner-up logit):
# lr 0.05, 600 steps ends at min margin 0.19 / 0.30 / 0.30 for seeds 0 / 1 / 2, positive from
# step ~350 on for all three. lr 0.1, 300 steps ended at 0.03 and flipped between right and
# wrong along the way: too close to call across machines.
# float32 math on a GPU too (no bf16 autocast): margins of 0.2 logits do not survive bf16
# rounding (on the H200 the adapter answered "nora" without the EOS after it).
SETTINGS = LoopSettings(lr=0.05, schedule="cosine", epochs=600, batch_size=len(PROMPTS),
                        max_grad_norm=None, seed=0, progress=False, bf16=False)


def records() -> list[dict]:
    return [{"prompt": p, "completion": COMPLETION} for p in PROMPTS]


def train_demo_adapter(out_dir: str | Path, loop: LoopSettings = SETTINGS,
                       mode: str = "replace") -> TrainResult:
    """Train the demo task's NoRA adapter into out_dir/adapter.safetensors (no eval split:
    the task is the three prompts)."""
    from nora_runtime.training.nora import NoraSettings

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demo_task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    cfg = TrainConfig(data=str(data), out=str(out), model=str(tiny_checkpoint()),
                      eval_fraction=0.0, plot=False,
                      nora=NoraSettings(mode=mode), loop=loop)
    return train(cfg)


@torch.no_grad()
def greedy(nm: NoraModel, tokenizer, prompt: str, slot: int,
           max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, list[float]]:
    """Greedy continuation of `prompt` with the transformers model on table slot `slot`
    (0 the base, 1 the adapter), stopping at EOS; and each step's top-1 minus top-2 logit."""
    device = next(nm.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    out, margins = [], []
    with nm.serving(torch.tensor([slot])):
        for _ in range(max_new_tokens):
            logits = nm.model(input_ids=ids).logits[0, -1].float()
            top = logits.topk(2).values
            margins.append((top[0] - top[1]).item())
            nxt = int(logits.argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return tokenizer.decode(out), margins


if __name__ == "__main__":
    import tempfile
    import time

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = train_demo_adapter(d)
        print(f"trained {r.trainable} parameters in {time.perf_counter() - t0:.1f} s, "
              f"final loss {r.history.train[-1][1]:.4f}")
        for p in PROMPTS:
            text, margins = greedy(r.model, tok, p, 1)
            base, _ = greedy(r.model, tok, p, 0)
            print(f"{p!r}: adapter {text!r} (min margin {min(margins):.3f}), base {base!r}")
