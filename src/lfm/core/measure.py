"""What a block of work cost: CPU and wall seconds, forward calls of the model, peak memory.

The benchmarks wrap each method's run in a `Meter` and record the figures per unit of work (per
fact edited, per training step, per merged model) with `lfm.pipeline.plan.record`; `lfm plan
--task` reads them back to estimate what a run of a given size will cost.

    with Meter(model) as m:
        edit(model, facts)
    m.result.cpu_s, m.result.calls, m.result.peak_mib
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Measured:
    cpu_s: float  # CPU seconds of this process (every thread)
    wall_s: float
    calls: int  # forward calls of the metered modules (each module's own calls, not its children's)
    peak_mib: float  # peak resident-set growth over the block (CPU), or the CUDA peak


def rss_bytes() -> int:
    """The process's resident set now (Linux `/proc`; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Meter:
    """Measure a block: CPU and wall time, forward calls of `modules`, peak memory (sampled every
    20 ms on the CPU; `torch.cuda.max_memory_allocated` where CUDA is in use)."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self._calls = [0]
        self.result: Measured | None = None
        self._stop = threading.Event()
        self._base = self._peak = 0

    @property
    def calls(self) -> int:
        return self._calls[0]

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, rss_bytes())

    def __enter__(self) -> Meter:
        calls = self._calls

        def count(*_: Any) -> None:
            calls[0] += 1

        # A plain function, so that a copy of a metered module made inside the block (a λ search,
        # a student started from the teacher) counts into the same total: `deepcopy` copies the
        # hook table but keeps functions as they are.
        self._hooks = [m.register_forward_pre_hook(count) for m in self.modules]
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._base = self._peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu, wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        self._stop.set()
        self._thread.join()
        for h in self._hooks:
            h.remove()
        peak = max(self._peak, rss_bytes()) - self._base
        if self._cuda:
            peak = torch.cuda.max_memory_allocated()
        self.result = Measured(cpu, wall, self.calls, peak / 2**20)


def total(parts: list[Measured]) -> Measured:
    """Several blocks as one: times and calls summed, the highest peak."""
    return Measured(sum(p.cpu_s for p in parts), sum(p.wall_s for p in parts),
                    sum(p.calls for p in parts), max((p.peak_mib for p in parts), default=0.0))  # fmt: skip
