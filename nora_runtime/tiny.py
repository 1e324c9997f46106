"""A tiny random Llama, the fast test fixture: made deterministically (fixed seed, byte-level
tokenizer with a ChatML-like chat template) and saved as an ordinary transformers checkpoint,
so that tests go through the same loading path as real models. Its weights are random: it shows
the machinery, not skill (the default model, SmolLM2-135M-Instruct, is nora_runtime.checkpoint).
Also `random_adapter`: a NoRA adapter that visibly changes such a model's output.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from nora_runtime.adapter import NoraAdapter
from nora_runtime.checkpoint import cache_root
from nora_runtime.rational import base_coefficients

TINY_VERSION = "2"
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 256, 257, 258 after the 256 byte tokens


# ChatML-like turns; a turn ends with </s>, the EOS token, so generation stops at its end
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_dir() -> Path:
    return cache_root() / f"tiny-llama-v{TINY_VERSION}"


def byte_tokenizer(vocab_size: int | None = None):
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (multi-byte
    characters span several tokens), plus <s>, </s> and <pad>. Needs no training data.
    vocab_size: ids from 259 on up to it are tokens of 2-3 letters or digits, as in a trained
    vocabulary (encoding never makes them; they decode to their text): a benchmark's random
    model then samples ids that all have text, like a real model and tokenizer."""
    import itertools
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    chars = string.ascii_letters + string.digits  # their own stand-ins in the alphabet
    words = ("".join(w) for n in (2, 3) for w in itertools.product(chars, repeat=n))  # lazy
    first, extra = len(vocab), max(0, (vocab_size or 0) - len(vocab))
    vocab.update({w: first + i for i, w in enumerate(itertools.islice(words, extra))})
    if len(vocab) < first + extra:  # the 242,172 words ran out
        raise ValueError(f"vocab_size {vocab_size} > {len(vocab)}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(path: Path) -> None:
    """Write the tiny checkpoint (config, safetensors weights, tokenizer) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257,
        pad_token_id=258,
    )
    torch.manual_seed(20261128)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def tiny_checkpoint() -> Path:
    """The tiny checkpoint's directory, built on first use (atomically: concurrent first uses
    each build into a temporary directory and the first rename wins)."""
    path = tiny_dir()
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        build_tiny(tmp)
        with contextlib.suppress(OSError):  # another process finished first
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def random_adapter(info, seed: int) -> NoraAdapter:
    """A NoRA adapter for the served model described by `info` (an engine's ModelInfo) whose
    coefficients clearly differ from the base (B factors ~ N(0, 0.3); a trained adapter starts
    at B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeds NoraAdapter's kaiming init of A, locally
        torch.manual_seed(seed)
        m = NoraAdapter(base_coefficients(info.act), rank=3, alpha=6.0, groups=info.groups,
                        site_names=[f"model.layers.{i}.mlp.act_fn"
                                    for i in range(info.num_layers)],
                        act=info.act, mode=info.mode)
    with torch.no_grad():
        for p in (m.num_B, m.den_B):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m
