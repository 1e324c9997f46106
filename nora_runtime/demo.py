"""The built-in demo model: a small Llama made deterministically (fixed seed, byte-level
tokenizer) and saved as an ordinary transformers checkpoint, so that it is served through the
same loading path as real models. Its weights are random: it shows the machinery, not skill.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEMO_VERSION = "1"
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 256, 257, 258 after the 256 byte tokens


def demo_dir() -> Path:
    root = Path(os.environ.get("NORA_CACHE", Path.home() / ".cache" / "nora"))
    return root / f"demo-llama-v{DEMO_VERSION}"


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (multi-byte
    characters span several tokens), plus <s>, </s> and <pad>. Needs no training data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_demo(path: Path) -> None:
    """Write the demo checkpoint (config, safetensors weights, tokenizer) to `path`."""
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


def demo_checkpoint() -> Path:
    """The demo checkpoint's directory, built on first use (atomically: concurrent first uses
    each build into a temporary directory and the first rename wins)."""
    path = demo_dir()
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        build_demo(tmp)
        with contextlib.suppress(OSError):  # another process finished first
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
