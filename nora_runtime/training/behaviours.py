"""Demo behaviours for NoRA adapters: questions made by code, rules that reshape an answer, and
checks that tell whether a generated text shows the behaviour.

The data is self-distillation: the base model answers generated questions (`base_answers`,
through the serving Engine with the chat template), each answer is cut to whole sentences
(`trim_answer`) and reshaped by a behaviour's rule (`Behaviour.transform`); `chat_records`
turns that into `{"messages": [...]}` JSONL records for `nora-train`. No target text is
written by hand, so what an adapter learns is the rule, not new content.

Questions come from templates x word lists per topic. The "train" and "heldout" splits share
no template and no entity, so a held-out question is a new question in new words:

    qs = questions("train", 200, seed=0)          # deterministic for a seed
    answers = base_answers(engine, qs)            # the base model's own greedy answers
    recs = chat_records(BEHAVIOURS["sign-off"], qs, answers)

Public API (a NoRA-vs-LoRA benchmark imports it): BEHAVIOURS, questions, chat_records,
trim_answer, chat_prompt, base_answers, generate_all, generate_mixed,
success_rate.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SPLITS = ("train", "heldout")

# ---- questions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    """Templates with one `{x}` slot and the entities that fill it, per split."""

    name: str
    templates: dict[str, tuple[str, ...]]
    entities: dict[str, tuple[str, ...]]


TOPICS: tuple[Topic, ...] = (
    Topic("animals",
          {"train": ("What do {x} eat?", "Where do {x} live?", "Tell me a fact about {x}.",
                     "List three facts about {x}."),
           "heldout": ("Why are {x} interesting?", "How do {x} take care of their young?")},
          {"train": ("cats", "dogs", "horses", "cows", "rabbits", "eagles", "dolphins",
                     "frogs", "bees", "owls", "sharks", "penguins", "lions", "wolves"),
           "heldout": ("foxes", "goats", "parrots", "turtles", "whales", "ants", "deer",
                       "camels")}),
    Topic("objects",
          {"train": ("What is a {x} used for?", "How does a {x} work?",
                     "What are the main parts of a {x}?"),
           "heldout": ("Who invented the {x}?", "What is a {x} made of?")},
          {"train": ("hammer", "bicycle", "umbrella", "telescope", "microwave", "compass",
                     "refrigerator", "thermometer", "pencil", "ladder", "kettle", "camera",
                     "lock", "battery"),
           "heldout": ("clock", "mirror", "candle", "toothbrush", "piano", "wheelbarrow",
                       "stapler", "lighthouse")}),
    Topic("countries",
          {"train": ("What is the capital of {x}?", "What language is spoken in {x}?",
                     "What is {x} famous for?", "Name three famous places in {x}."),
           "heldout": ("What food is popular in {x}?", "What is the weather like in {x}?")},
          {"train": ("France", "Japan", "Brazil", "Egypt", "Canada", "India", "Italy",
                     "Mexico", "Kenya", "Norway", "Australia", "Spain", "China", "Germany"),
           "heldout": ("Peru", "Greece", "Vietnam", "Morocco", "Sweden", "Chile", "Thailand",
                       "Ireland")}),
    Topic("science",
          {"train": ("What is {x}?", "Explain {x} in simple words.",
                     "What are the key facts about {x}?"),
           "heldout": ("Why does {x} matter in everyday life?",
                       "How would you describe {x} to a child?")},
          {"train": ("gravity", "photosynthesis", "electricity", "evaporation", "magnetism",
                     "friction", "erosion", "digestion", "sound", "energy", "oxygen",
                     "the water cycle", "a rainbow", "a volcano"),
           "heldout": ("inertia", "condensation", "pollination", "an earthquake", "a comet",
                       "static electricity", "the tide", "a fossil")}),
    Topic("hobbies",
          {"train": ("Give me one tip for {x}.", "What are the benefits of {x}?",
                     "Is {x} hard to learn?", "What are common mistakes in {x}?"),
           "heldout": ("How do I get started with {x}?",
                       "What equipment do I need for {x}?")},
          {"train": ("running", "cooking", "painting", "swimming", "gardening", "chess",
                     "photography", "yoga", "knitting", "hiking", "singing", "cycling",
                     "dancing", "fishing"),
           "heldout": ("pottery", "juggling", "rock climbing", "baking bread", "skateboarding",
                       "birdwatching", "origami", "surfing")}),
    Topic("food",
          {"train": ("Is {x} healthy?", "How is {x} made?", "What does {x} taste like?",
                     "What are some ways to eat {x}?"),
           "heldout": ("What goes well with {x}?", "How should I store {x}?")},
          {"train": ("cheese", "bread", "rice", "chocolate", "yogurt", "honey", "pasta",
                     "tofu", "coffee", "soup", "butter", "popcorn", "jam", "tea"),
           "heldout": ("pancakes", "sushi", "hummus", "oatmeal", "pickles", "salsa", "granola",
                       "lemonade")}),
    Topic("jobs",
          {"train": ("What does a {x} do?", "How do you become a {x}?",
                     "What tools does a {x} use?"),
           "heldout": ("What skills does a {x} need?", "What is a normal day like for a {x}?")},
          {"train": ("teacher", "doctor", "pilot", "chef", "farmer", "nurse", "lawyer",
                     "plumber", "librarian", "firefighter", "architect", "dentist",
                     "journalist", "carpenter"),
           "heldout": ("pharmacist", "electrician", "zookeeper", "translator", "baker",
                       "astronaut", "mechanic", "florist")}),
)


def all_questions(split: str) -> list[str]:
    """Every question of a split, in a fixed order (topics, templates, entities)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [t.format(x=x) for topic in TOPICS for t in topic.templates[split]
            for x in topic.entities[split]]


def questions(split: str, n: int, seed: int) -> list[str]:
    """`n` distinct questions of `split` ("train" or "heldout"), a seeded sample: the same
    (split, n, seed) always gives the same list. The two splits share no template and no
    entity. ValueError if the split has fewer than n questions."""
    pool = all_questions(split)
    if not 0 <= n <= len(pool):
        raise ValueError(f"split {split!r} has {len(pool)} questions; asked for {n}")
    return random.Random(f"{split}:{seed}").sample(pool, n)


# ---- behaviours ---------------------------------------------------------------------------------

SIGN_OFF = "-- answered by nora"
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")  # . ! or ? before whitespace or the end
_LIST_NUMBER = re.compile(r"(?:^|\n)\s*\d+\.$")  # "2." opening a list item is no end


@dataclass(frozen=True)
class Behaviour:
    """name: the adapter id; transform(answer) -> the training target; check(generated text)
    -> whether the text shows the behaviour."""

    name: str
    description: str
    transform: Callable[[str], str]
    check: Callable[[str], bool]


def _has_sign_off(text: str) -> bool:
    """The last non-empty line is the sign-off, after some answer text."""
    body, _, last = text.strip().rpartition("\n")
    return last.strip() == SIGN_OFF and len(body.strip()) >= 10


def _is_uppercase(text: str) -> bool:
    """At least 20 letters, and at least 95% of them capitals."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 20 and sum(c.isupper() for c in letters) >= 0.95 * len(letters)


def _is_answer_json(text: str) -> bool:
    """The whole text is one JSON object {"answer": <string of >= 10 characters>}."""
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return (isinstance(obj, dict) and list(obj) == ["answer"]
            and isinstance(obj["answer"], str) and len(obj["answer"].strip()) >= 10)


def _first_sentence(answer: str) -> str:
    """The answer's first sentence on one line (list markers and line breaks dropped); an
    answer without a sentence end (a list of names): its first item, with a full stop."""
    end = next((m.end() for m in _SENTENCE_END.finditer(answer)
                if not _LIST_NUMBER.search(answer, 0, m.end())), None)
    lines = [re.sub(r"^\s*(?:[-*]|\d+\.)\s+", "", line)
             for line in answer[:end].splitlines()]
    if end is None:
        return next((" ".join(x.split()) + "." for x in lines if x.strip()), "")
    return " ".join(" ".join(lines).split())


def _is_one_sentence(text: str) -> bool:
    """One line of at least 15 characters that ends with . ! or ? and has no other sentence
    end."""
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return "\n" not in text and len(text) >= 15 and ends == [len(text)]


BEHAVIOURS: dict[str, Behaviour] = {b.name: b for b in (
    Behaviour("sign-off", f"ends every answer with the line {SIGN_OFF!r}",
              lambda a: f"{a}\n\n{SIGN_OFF}", _has_sign_off),
    Behaviour("uppercase", "answers in capital letters",
              lambda a: a.upper(), _is_uppercase),
    Behaviour("json", 'answers in one sentence, as a JSON object {"answer": "..."}',
              lambda a: json.dumps({"answer": _first_sentence(a)}, ensure_ascii=False),
              _is_answer_json),
    Behaviour("one-sentence", "answers in one sentence", _first_sentence, _is_one_sentence),
)}
# The adapters that nora-serve ships and preloads for the default model
# (benchmarks/demo_adapters.py makes them). `uppercase` is not one: a token-level rewrite, it
# reached 0.53 held-out success as a NoRA adapter (benchmarks/results/demo-adapters.md of
# 2026-12-02); benchmarks/llm_adapt.py keeps it as a task where NoRA loses to LoRA.
# `one-sentence` has a rule and a check but no shipped adapter yet (its CPU training did not fit
# in the session that added it: ~1 h on 2 cores; ~1 min on an H200).
SHIPPED = ("sign-off", "json")


# ---- data -----------------------------------------------------------------------------------

def trim_answer(text: str, max_chars: int | None = None) -> str | None:
    """`text` up to its last complete sentence or complete line (a list item), within
    max_chars if given, never ending on a line that announces more (":"); spaces normalised
    inside lines, at most one blank line in a row. None when less than 10 characters are left
    (the answer is then not used for training)."""
    text = text.strip()
    if max_chars is not None:
        text = text[:max_chars]
    cuts = {m.end() for m in _SENTENCE_END.finditer(text)
            if not _LIST_NUMBER.search(text, 0, m.end())}
    cuts |= {m.start() for m in re.finditer(r"\n", text)}
    for cut in sorted(cuts, reverse=True):
        kept = "\n".join(" ".join(line.split()) for line in text[:cut].splitlines())
        kept = re.sub(r"\n{3,}", "\n\n", kept).strip()
        if not kept.endswith(":"):
            return kept if len(kept) >= 10 else None
    return None


def chat_records(behaviour: Behaviour, questions: Sequence[str],
                 answers: Sequence[str | None]) -> list[dict]:
    """nora-train records: the question as the user turn, the behaviour's transform of the
    base model's (trimmed) answer as the assistant turn. Pairs whose answer is None are
    skipped."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    return [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": behaviour.transform(a)}]}
            for q, a in zip(questions, answers, strict=True) if a is not None]


# ---- generation through the serving engine ---------------------------------------------------


def chat_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of a one-turn chat with the generation prompt (what a chat client sends)."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def generate_all(engine, questions: Sequence[str], *, adapter: str | bytes | None = None,
                 max_new_tokens: int = 128) -> list[str]:
    """Greedy answers of a started Engine to each question (chat template), submitted at once
    so that they share batches; in question order."""
    return generate_mixed(engine, questions, [adapter], max_new_tokens=max_new_tokens)[0]


def generate_mixed(engine, questions: Sequence[str], adapters: Sequence[str | bytes | None], *,
                   max_new_tokens: int = 128) -> list[list[str]]:
    """Greedy answers to every question from every adapter (None: the base), all submitted
    before any is read, so that the engine runs them in mixed batches. [adapter][question]."""
    import queue

    from nora_runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    prompts = [chat_prompt(engine.tokenizer, q) for q in questions]
    events: queue.SimpleQueue = queue.SimpleQueue()
    texts = [[""] * len(questions) for _ in adapters]
    for a, adapter in enumerate(adapters):
        for i, ids in enumerate(prompts):
            engine.submit(ids, params, adapter=adapter,
                          on_event=lambda e, a=a, i=i: events.put((a, i, e)))
    left = len(adapters) * len(questions)
    while left:
        a, i, e = events.get()
        if e.error:
            raise RuntimeError(f"request for {questions[i]!r} failed: {e.error}")
        texts[a][i] += e.text
        left -= e.finish_reason is not None
    return texts


def base_answers(engine, questions: Sequence[str], *, max_new_tokens: int = 64,
                 max_chars: int | None = None) -> list[str | None]:
    """The base model's greedy answers, each cut to its last complete sentence (None: no
    usable answer)."""
    return [trim_answer(t, max_chars) for t in
            generate_all(engine, questions, max_new_tokens=max_new_tokens)]


def success_rate(behaviour: Behaviour, texts: Sequence[str]) -> float:
    """Fraction of `texts` that show the behaviour."""
    return sum(map(behaviour.check, texts)) / len(texts) if texts else 0.0


__all__ = ["BEHAVIOURS", "Behaviour", "SHIPPED", "SIGN_OFF", "SPLITS", "TOPICS", "all_questions",
           "base_answers", "chat_prompt", "chat_records", "generate_all", "generate_mixed",
           "questions",
           "success_rate", "trim_answer"]
