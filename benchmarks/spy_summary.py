"""A py-spy profile of a running server, as a table: where each thread spends its samples.

    py-spy record -p PID -d 5 -r 200 --threads -f raw -o spy.raw    # while a benchmark runs
    python benchmarks/spy_summary.py spy.raw --out profile-serve-h200 [--note "..."]

py-spy samples every thread `rate` times a second and leaves out idle ones (blocked in a system
call), so a thread's samples over the duration's samples is the share of time it was running or
waiting for the GIL. Per thread: that share, then the functions with the largest inclusive
share of its samples (a function and its file, lines together; a stack counts it once).
Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(path: Path) -> dict[str, collections.Counter]:
    """thread name -> Counter of stacks (tuples of frames, outermost first) -> samples."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\): ", "", frames[0])
        name = re.sub(r"-\d+$", "-N", name)  # a pool's threads together
        threads[name][tuple(frames[1:])] += int(n)
    return threads


def inclusive(stacks: collections.Counter, top: int) -> list[tuple[str, int]]:
    share: collections.Counter = collections.Counter()
    for frames, n in stacks.items():
        for f in {re.sub(r":\d+\)$", ")", f) for f in frames}:  # a function, not a line
            share[f] += n
    return share.most_common(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", type=Path, help="py-spy record -f raw output")
    p.add_argument("--out", required=True, help="results name under benchmarks/results/")
    p.add_argument("--seconds", type=float, default=5.0, help="the recording's duration")
    p.add_argument("--rate", type=int, default=200, help="the recording's samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--note", default="", help="a paragraph for the markdown: what ran")
    a = p.parse_args()
    total = a.seconds * a.rate
    threads = parse(a.raw)
    doc = {"source": a.raw.name, "seconds": a.seconds, "rate": a.rate, "note": a.note,
           "threads": {name: {"active": sum(s.values()) / total,
                              "top": [[f, n / sum(s.values())] for f, n in inclusive(s, a.top)]}
                       for name, s in sorted(threads.items(), key=lambda t: -sum(t[1].values()))}}
    out = ROOT / "benchmarks" / "results" / a.out
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# py-spy profile ({a.out})", "", a.note, "",
             f"{a.seconds:g} s at {a.rate} samples/s. Active: the share of the recording in which "
             "the thread ran Python or waited for the GIL (py-spy leaves idle threads out).", "",
             "| thread | active |", "|---|---|"]
    lines += [f"| {name} | {t['active']:.0%} |" for name, t in doc["threads"].items()]
    for name, t in list(doc["threads"].items())[:2]:  # the two busiest
        lines += ["", f"## {name}: inclusive share of its samples", "", "| share | function |",
                  "|---|---|"]
        lines += [f"| {s:.1%} | `{f}` |" for f, s in t["top"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
