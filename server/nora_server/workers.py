"""Worker threads for the servicer's blocking calls (tokenizing, chat templating, adapter loads).

Two reasons not to use asyncio's default executor (`asyncio.to_thread`):
- Isolation: it is one pool of min(32, CPUs + 4) threads for everything. Six long Tokenize
  calls filled it on a 2-core machine and a 2-token Generate waited 40 s behind them. Each kind
  of work gets its own pool here, with a bound on the calls waiting (`Busy` beyond it).
- Exit: its threads are not daemons, so one stuck call (a read that never returns) kept the
  process alive after "stopped": asyncio.run and the interpreter's exit join them forever.
  These threads are daemons: a stuck call dies with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """A pool's threads are all busy and its queue is full (the RPC answers
    RESOURCE_EXHAUSTED)."""


class WorkerPool:
    """`threads` daemon threads running calls for asyncio callers, `max_waiting` calls queued
    behind them at most (None: unbounded)."""

    def __init__(self, name: str, threads: int, max_waiting: int | None = None) -> None:
        self.name, self.threads, self.max_waiting = name, threads, max_waiting
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # queued or running, until the call returns (even if nobody waits)
        self.calls = 0  # calls accepted so far
        for i in range(threads):
            threading.Thread(target=self._work, name=f"nora-{name}-{i}", daemon=True).start()

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a worker thread. Busy when the pool is full. Cancelling
        the caller does not stop a call that has started (threads cannot be interrupted); one
        still queued is skipped."""
        with self._lock:
            if self.max_waiting is not None and self._pending >= self.threads + self.max_waiting:
                raise Busy(f"the {self.name} workers are busy ({self._pending} calls running "
                           "or queued); retry later")
            self._pending += 1
            self.calls += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args, kwargs))
        return await future

    def close(self) -> None:
        """Let idle threads end (a stuck one ends with the process: it is a daemon)."""
        for _ in range(self.threads):
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, fn, args, kwargs = item
            run = not future.cancelled()  # else its caller left while it waited: skip it
            error, value = False, None
            if run:
                try:
                    value = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the caller, which re-raises it
                    error, value = True, exc
            with self._lock:  # free before the caller hears back, so it may call again at once
                self._pending -= 1
            if run:
                _deliver(loop, future, value, error=error)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any, *,
             error: bool) -> None:
    def settle() -> None:
        if not future.done():
            (future.set_exception if error else future.set_result)(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)
