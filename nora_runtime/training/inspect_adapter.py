"""`nora-inspect ADAPTER [--plot out.png]`: what an adapter file holds (metadata, trainable
parameters, bytes) and, with --plot, each site's adapted activation curves against the base."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nora_runtime.adapter import FACTORS, AdapterError, LoadedAdapter, load_adapter


def summary(a: LoadedAdapter, nbytes: int) -> dict:
    """Metadata, parameter counts and sizes of a loaded adapter (JSON-serialisable)."""
    s = a.spec
    nora = sum(a.tensors[n].numel() for n in FACTORS)
    out = {
        "kind": "NoRA++" if a.lora else "NoRA",
        "base_fingerprint": a.base_fingerprint, "act": s.act, "mode": s.mode,
        "sites": len(s.sites), "base_groups": s.base_groups, "groups": s.groups,
        "rank": s.rank, "alpha": s.alpha,
        "trainable_parameters": {"nora": nora, "lora": a.lora.num_parameters() if a.lora else 0},
        "file_bytes": nbytes, "coefficient_bytes": a.nbytes,
        # how far training moved each site: max |adapted - base| coefficient
        "max_coefficient_change": [round(float(d), 6) for d in
                                   (a.coefs - a.tensors["base"].repeat_interleave(
                                       s.groups // s.base_groups, dim=1)).abs().amax((1, 2))],
    }
    if a.lora:
        out["lora"] = {"rank": a.lora.rank, "alpha": a.lora.alpha,
                       "modules": list(a.lora.factors)}
    out["trainable_parameters"]["total"] = sum(out["trainable_parameters"].values())
    return out


def format_summary(d: dict, sites: list[str]) -> str:
    p = d["trainable_parameters"]
    lines = [
        f"kind              {d['kind']}",
        f"base fingerprint  {d['base_fingerprint']}",
        f"activation        {d['act']} ({d['mode']} mode)",
        f"sites             {d['sites']}",
        f"groups            {d['groups']} (base {d['base_groups']})",
        f"rank, alpha       {d['rank']}, {d['alpha']:g}",
        f"trainable params  {p['total']:,} (NoRA {p['nora']:,}, LoRA {p['lora']:,})",
        f"bytes             file {d['file_bytes']:,}, merged coefficients "
        f"{d['coefficient_bytes']:,}",
    ]
    if "lora" in d:
        lo = d["lora"]
        lines.append(f"LoRA              rank {lo['rank']}, alpha {lo['alpha']:g}, "
                     f"{len(lo['modules'])} modules: {', '.join(lo['modules'][:4])}"
                     + (", ..." if len(lo["modules"]) > 4 else ""))
    lines.append("max |coefficient change| per site:")
    lines += [f"  {name}  {c:.4g}" for name, c in zip(sites, d["max_coefficient_change"],
                                                       strict=True)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nora-inspect", description="Show a NoRA adapter file: "
                                "metadata, trainable parameters, bytes; optionally plot it.")
    p.add_argument("adapter", help="adapter .safetensors file")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="draw each site's adapted activations against the base "
                   "(default file: ADAPTER with .png)")
    p.add_argument("--range", type=float, default=4.0, help="plot x in [-R, R] (default 4)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    try:
        loaded = load_adapter(a.adapter)
    except (AdapterError, OSError) as e:
        print(f"nora-inspect: {a.adapter}: {e}", file=sys.stderr)
        return 1
    d = summary(loaded, os.path.getsize(a.adapter))
    print(json.dumps(d, indent=1) if a.json else format_summary(d, list(loaded.spec.sites)))
    if a.plot is not None:
        from nora_runtime.training.plots import activation_curves

        out = Path(a.plot) if a.plot else Path(a.adapter).with_suffix(".png")
        activation_curves(loaded.coefs, loaded.tensors["base"], loaded.spec.act,
                          list(loaded.spec.sites), out, x_range=a.range)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
