"""A fixed-bucket histogram the engine and the adapter registry fill for the server's metrics,
without depending on prometheus_client (the server turns `snapshot()` into a Prometheus
histogram at scrape time).

`observe` is one bisect and two additions under a lock: cheap enough for once per engine step
or once per adapter load, not meant for per-token use.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]  # upper bounds, ascending (+Inf implied after the last)
    counts: tuple[int, ...]  # cumulative: observations <= each bound, then the total
    sum: float

    @property
    def count(self) -> int:
        return self.counts[-1]


class Histogram:
    """Counts of observations per bucket (`bounds`: ascending upper bounds, inclusive, as in
    Prometheus) and their sum. Thread-safe."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bounds must be ascending and distinct, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # first bound >= value
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for n in counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), total)


def powers_of_two(limit: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to the first power of two >= limit."""
    bounds, b = [], 1
    while True:
        bounds.append(float(b))
        if b >= limit:
            return tuple(bounds)
        b *= 2
