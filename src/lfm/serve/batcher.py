"""Dynamic batching: requests from many clients share one forward pass, and none holds the rest.

A request is a list of items for one operation (`op`, `key`). The worker takes the first queued
request, waits up to `max_wait_ms` for more of the same (op, key), and runs one pass: up to
`max_batch` items whose padded cost (`cost(op, key, n, width)` bytes) stays within
`max_pass_bytes`, taken from the requests in queue order, in a worker thread. A request with items
left goes to the back of the queue, so a small request waits at most about one bounded pass behind
a large one. A request whose caller stopped waiting (a timeout) is dropped before its next pass,
and a pass whose requests all stopped waiting ends at the operation's next `check_stop`, which
frees the worker. The queue is bounded: `submit` raises `QueueFull` instead of letting
latency grow without limit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

Op = Callable[[list[Any], Hashable], list[Any]]
Cost = Callable[[str, Hashable, int, int], int]  # (op, key, items, padded width) -> bytes


class QueueFull(Exception):
    """The server queue holds `max_queue` requests already."""


class Stopped(Exception):
    """Every request of the running pass stopped waiting (timed out): the pass ends early."""


# the running pass's stop flag, seen by the operation in its worker thread (to_thread copies it)
_stop: ContextVar[threading.Event | None] = ContextVar("lfm_serve_stop", default=None)


def check_stop() -> None:
    """Raise `Stopped` when no request of the running pass waits any more; operations call this
    between the pieces of a pass, so a request's 504 also frees the worker within one piece."""
    flag = _stop.get()
    if flag is not None and flag.is_set():
        raise Stopped("every request of this pass stopped waiting")


@dataclass(eq=False)  # jobs are compared by identity (`job in queue`): their results hold tensors
class _Job:
    op: str
    key: Hashable
    items: list[Any]
    sizes: list[int]  # tokens (or positions) of each item, for the cost of a pass
    future: asyncio.Future
    done: int = 0  # items handed to passes so far
    results: list[Any] = field(default_factory=list)


@dataclass
class Stats:
    passes: int = 0  # operation calls (forward passes of a batch)
    items: int = 0
    requests: int = 0  # requests that took part in a pass (counted once each)
    sizes: list[int] = field(default_factory=list)
    dropped: int = 0  # requests dropped unfinished because their caller stopped waiting
    stopped: int = 0  # passes ended early (`check_stop`) because all their callers stopped waiting


class Batcher:
    """Collects requests for a few ms and runs them together; one worker runs at a time.

    Args:
        ops: operation name -> fn(items, key) returning one result per item.
        max_batch: the most items one pass takes.
        max_wait_ms: how long the first request waits for company.
        max_queue: the most requests waiting; more raise `QueueFull`.
        cost: bytes a pass of n items padded to a width holds; None: passes bounded by count only.
        max_pass_bytes: the most a pass may cost (a single item always runs, alone if need be).
    """

    def __init__(self, ops: dict[str, Op], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, cost: Cost | None = None,
                 max_pass_bytes: int | None = None):  # fmt: skip
        self.ops, self.max_batch, self.max_wait = ops, max_batch, max_wait_ms / 1000
        self.max_queue, self.cost, self.max_pass_bytes = max_queue, cost, max_pass_bytes
        self.stats = Stats()
        self._queue: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, op: str, items: Sequence[Any], key: Hashable = None,
                     sizes: Sequence[int] | None = None) -> list[Any]:  # fmt: skip
        """Queue one request and wait for its results (`sizes`: each item's tokens)."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"server queue is full ({self.max_queue} requests); retry later")
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        job = _Job(op, key, list(items), list(sizes or [1] * len(items)), loop.create_future())
        if not job.items:
            return []
        self._queue.append(job)
        self._wake.set()  # type: ignore[union-attr]
        return await job.future

    def _ensure_worker(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._wake.clear()  # type: ignore[union-attr]
                await self._wake.wait()  # type: ignore[union-attr]
                continue
            deadline = time.monotonic() + self.max_wait
            while time.monotonic() < deadline and self._pending_items() < self.max_batch:
                await asyncio.sleep(min(0.001, self.max_wait))
            self._drop_abandoned()
            if self._queue:
                await self._run_pass(self._take())

    def _drop_abandoned(self) -> None:
        """Forget requests whose caller stopped waiting: their remaining items never run."""
        kept = [j for j in self._queue if not j.future.done()]
        self.stats.dropped += len(self._queue) - len(kept)
        self._queue = kept

    def _pending_items(self) -> int:
        if not self._queue:
            return self.max_batch
        first = self._queue[0]
        return sum(len(j.items) - j.done for j in self._queue
                   if (j.op, j.key) == (first.op, first.key))  # fmt: skip

    def _fits(self, op: str, key: Hashable, n: int, width: int) -> bool:
        if n > self.max_batch:
            return False
        if self.cost is None or self.max_pass_bytes is None:
            return True
        return self.cost(op, key, n, width) <= self.max_pass_bytes

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Slices (job, start, stop) of the first job and the next of the same (op, key) that fit
        in one pass; at least one item."""
        first = self._queue[0]
        taken: list[tuple[_Job, int, int]] = []
        n, width = 0, 0
        for job in [j for j in self._queue if (j.op, j.key) == (first.op, first.key)]:
            stop = job.done
            while stop < len(job.items):
                w = max(width, job.sizes[stop])
                if n and not self._fits(job.op, job.key, n + 1, w):
                    break
                n, width, stop = n + 1, w, stop + 1
            if stop > job.done:
                taken.append((job, job.done, stop))
                job.done = stop
            if stop < len(job.items):
                break  # the pass is full
        return taken

    async def _run_pass(self, slices: list[tuple[_Job, int, int]]) -> None:
        items = [it for job, a, b in slices for it in job.items[a:b]]
        op, key = slices[0][0].op, slices[0][0].key
        self._count(slices, len(items))
        flag = threading.Event()
        for job, _, _ in slices:
            job.future.add_done_callback(lambda _f: self._stop_if_abandoned(slices, flag))
        token = _stop.set(flag)
        try:
            out = await asyncio.to_thread(self.ops[op], items, key)
        except Exception as e:  # each request in the pass gets the error, the worker lives on
            self.stats.stopped += isinstance(e, Stopped)
            for job, _, _ in slices:
                self._finish(job, exc=e)
            return
        finally:
            _stop.reset(token)
        start = 0
        for job, a, b in slices:
            job.results += out[start : start + b - a]
            start += b - a
            if job.done == len(job.items):
                self._finish(job)
        for job, _, _ in slices:  # a request with items left waits behind the others
            if job in self._queue and job.done < len(job.items):
                self._queue.remove(job)
                self._queue.append(job)

    @staticmethod
    def _stop_if_abandoned(slices: list[tuple[_Job, int, int]], flag: threading.Event) -> None:
        if all(job.future.done() for job, _, _ in slices):
            flag.set()

    def _count(self, slices: list[tuple[_Job, int, int]], n: int) -> None:
        self.stats.passes += 1
        self.stats.items += n
        self.stats.requests += sum(1 for job, a, _ in slices if a == 0)
        self.stats.sizes.append(n)

    def _finish(self, job: _Job, exc: Exception | None = None) -> None:
        if job in self._queue:
            self._queue.remove(job)
        if job.future.done():  # a cancelled (timed-out) request is skipped
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(job.results)
