"""Dynamic batching: requests from many clients share one forward pass.

A request is a list of items for one operation (`op`, `key`). The worker takes the first queued
request, waits up to `max_wait_ms` for more of the same (op, key) until `max_batch` items, runs the
concatenated items through the operation once in a worker thread, and splits the results back.
The queue is bounded: `submit` raises `QueueFull` instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

Op = Callable[[list[Any], Hashable], list[Any]]


class QueueFull(Exception):
    """The server queue holds `max_queue` requests already."""


@dataclass
class _Job:
    op: str
    key: Hashable
    items: list[Any]
    future: asyncio.Future


@dataclass
class Stats:
    passes: int = 0  # operation calls (forward passes of a batch)
    items: int = 0
    requests: int = 0
    sizes: list[int] = field(default_factory=list)


class Batcher:
    """Collects requests for a few ms and runs them together; one worker runs at a time.

    Args:
        ops: operation name -> fn(items, key) returning one result per item.
        max_batch: the most items one pass takes (a request larger than this runs alone).
        max_wait_ms: how long the first request waits for company.
        max_queue: the most requests waiting; more raise `QueueFull`.
    """

    def __init__(self, ops: dict[str, Op], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256):  # fmt: skip
        self.ops, self.max_batch, self.max_wait = ops, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = Stats()
        self._queue: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, op: str, items: Sequence[Any], key: Hashable = None) -> list[Any]:
        """Queue one request and wait for its results."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"server queue is full ({self.max_queue} requests); retry later")
        self._ensure_worker()
        job = _Job(op, key, list(items), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()  # type: ignore[union-attr]
        return await job.future

    def _ensure_worker(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()  # type: ignore[union-attr]
                await self._wake.wait()  # type: ignore[union-attr]
            deadline = time.monotonic() + self.max_wait
            while time.monotonic() < deadline and self._pending_items() < self.max_batch:
                await asyncio.sleep(min(0.001, self.max_wait))
            await self._run_batch(self._take())

    def _pending_items(self) -> int:
        first = self._queue[0]
        return sum(len(j.items) for j in self._queue if (j.op, j.key) == (first.op, first.key))

    def _take(self) -> list[_Job]:
        """The first job and the next ones of the same (op, key) that fit in `max_batch`."""
        first, taken, size = self._queue[0], [], 0
        for job in list(self._queue):
            same = (job.op, job.key) == (first.op, first.key)
            if same and (not taken or size + len(job.items) <= self.max_batch):
                taken.append(job)
                size += len(job.items)
                self._queue.remove(job)
        return taken

    async def _run_batch(self, jobs: list[_Job]) -> None:
        items = [it for j in jobs for it in j.items]
        self.stats.passes += 1
        self.stats.items += len(items)
        self.stats.requests += len(jobs)
        self.stats.sizes.append(len(items))
        try:
            out = await asyncio.to_thread(self.ops[jobs[0].op], items, jobs[0].key)
        except Exception as e:  # each waiting request gets the error, the worker lives on
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        start = 0
        for j in jobs:
            if not j.future.done():  # a cancelled (timed-out) request is skipped
                j.future.set_result(out[start : start + len(j.items)])
            start += len(j.items)
