"""Training data: JSONL records -> token examples with a loss mask, a train/eval split, batches.

One JSON object per line, one of:

    {"prompt": "...", "completion": "..."}   loss on the completion (+ EOS) only
    {"messages": [{"role": ..., "content": ...}, ...]}
                                             rendered with the tokenizer's chat template; loss on
                                             the assistant turns only
    {"text": "..."}                          loss on every token (plain language modelling)
    {"text": "...", "label": 3 or "pos"}     classification (an encoder with a classification head)

The prompt is tokenized alone (as a server tokenizes a request's prompt) and the completion
after it, so what the model learns to continue is exactly what it will see at inference.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

IGNORE = -100  # label of tokens without loss (transformers' convention)


@dataclass
class Example:
    """input_ids [n]; labels: [n] token targets (IGNORE where no loss) or one class id."""

    input_ids: list[int]
    labels: list[int] | int


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not JSON: {e}") from e
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(r).__name__}")
            records.append(r)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def record_kind(r: dict) -> str:
    """"prompt_completion", "messages", "text" or "classification"."""
    if "prompt" in r and "completion" in r:
        return "prompt_completion"
    if "messages" in r:
        return "messages"
    if "text" in r and "label" in r:
        return "classification"
    if "text" in r:
        return "text"
    raise ValueError(f"record has none of prompt+completion, messages, text: keys {sorted(r)}")


def task_of(records: list[dict]) -> str:
    """"classification" if the records carry labels, else "causal_lm" (all must agree)."""
    kinds = {record_kind(r) == "classification" for r in records}
    if len(kinds) > 1:
        raise ValueError("mix of classification records ({text, label}) and language-model "
                         "records")
    return "classification" if kinds.pop() else "causal_lm"


def encode_causal(r: dict, tok, max_length: int) -> Example:
    """Token ids and per-token labels of one language-model record (truncated on the right)."""
    kind = record_kind(r)
    if kind == "prompt_completion":
        prompt = tok(r["prompt"])["input_ids"]
        answer = tok(r["completion"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            answer = answer + [tok.eos_token_id]
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
    elif kind == "messages":
        ids, labels = _encode_chat(r["messages"], tok)
    elif kind == "text":
        ids = tok(r["text"])["input_ids"]
        labels = list(ids)
    else:
        raise ValueError("a classification record ({text, label}) in language-model data")
    return Example(ids[:max_length], labels[:max_length])


def _encode_chat(messages: list[dict], tok) -> tuple[list[int], list[int]]:
    """The chat template's tokens; each assistant turn is the tokens it adds after the
    template's generation prompt for the turns before it."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("{\"messages\"} records need a tokenizer with a chat template; this one "
                         "has none (use {\"prompt\", \"completion\"} records)")

    def render(msgs: list[dict], gen: bool) -> list[int]:
        out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1], False)
        if upto[:len(before)] != before or ids[:len(upto)] != upto:
            raise ValueError("the chat template does not render earlier turns as a prefix of "
                             "later ones; cannot tell which tokens are the assistant's")
        labels[len(before):len(upto)] = upto[len(before):]
    return ids, labels


def label_ids(records: list[dict]) -> dict:
    """Class label -> id: integer labels map to themselves, others to their sorted order."""
    labels = {r["label"] for r in records}
    if all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        return {x: x for x in sorted(labels)}
    return {x: i for i, x in enumerate(sorted(labels, key=str))}


def encode_classification(r: dict, tok, label2id: dict, max_length: int) -> Example:
    ids = tok(r["text"], truncation=True, max_length=max_length)["input_ids"]
    return Example(ids, label2id[r["label"]])


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the last `eval_fraction` (at least one item if > 0) for eval."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = 0 if eval_fraction == 0 else max(1, round(len(items) * eval_fraction))
    if n_eval >= len(items):
        raise ValueError(f"{len(items)} records leave nothing to train on with "
                         f"eval_fraction={eval_fraction}")
    return items[:len(items) - n_eval], items[len(items) - n_eval:]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask [B, S] and labels ([B, S] or [B])."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, :len(e.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples])
    else:
        labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
