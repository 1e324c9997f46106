"""nora-inspect: metadata, trainable parameters and bytes of NoRA and NoRA++ files, --json,
--plot (a PNG of each site's curves), and a clear error for a bad file."""

from __future__ import annotations

import json

import torch

from nora_runtime.adapter import LoraWeights, NoraAdapter, save_adapter
from nora_runtime.rational import base_coefficients
from nora_runtime.training.inspect_adapter import main

FP = "ef" * 32
SITES = [f"model.layers.{i}.mlp.act_fn" for i in range(3)]


def write(tmp_path, lora: bool = False, name: str = "a.safetensors"):
    torch.manual_seed(0)
    m = NoraAdapter(base_coefficients("silu"), rank=2, alpha=4.0, groups=4, site_names=SITES,
                    act="silu", mode="replace")
    with torch.no_grad():
        m.num_B[1].fill_(0.5)  # only site 1 moves
    lw = None
    if lora:
        lw = LoraWeights(rank=2, alpha=8.0, factors={
            "model.layers.0.self_attn.q_proj": (torch.ones(2, 16), torch.zeros(8, 2))})
    path = tmp_path / name
    save_adapter(m, path, base_fingerprint=FP, lora=lw)
    return path


def test_inspect_nora(tmp_path, capsys):
    path = write(tmp_path)
    assert main([str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    nora = 3 * (2 * 6 + 4 * 2 + 2 * 4 + 4 * 2)  # sites x (num_A, num_B, den_A, den_B)
    assert d["kind"] == "NoRA" and d["base_fingerprint"] == FP
    assert (d["act"], d["mode"], d["sites"], d["groups"], d["rank"]) == ("silu", "replace", 3,
                                                                         4, 2)
    assert d["trainable_parameters"] == {"nora": nora, "lora": 0, "total": nora}
    assert d["file_bytes"] == path.stat().st_size and d["coefficient_bytes"] == 3 * 4 * 40
    changes = d["max_coefficient_change"]
    assert changes[0] == changes[2] == 0.0 and changes[1] > 0
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert f"trainable params  {nora:,} (NoRA {nora:,}, LoRA 0)" in text
    assert "model.layers.1.mlp.act_fn" in text


def test_inspect_nora_plus_plus_and_plot(tmp_path, capsys):
    path = write(tmp_path, lora=True)
    png = tmp_path / "curves.png"
    assert main([str(path), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "kind              NoRA++" in text
    assert "LoRA 48" in text and "model.layers.0.self_attn.q_proj" in text
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert main([str(path), "--plot"]) == 0  # default: next to the adapter
    assert path.with_suffix(".png").exists()


def test_inspect_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an adapter")
    assert main([str(bad)]) == 1
    assert "not a safetensors file" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.safetensors")]) == 1
