"""Draws under a seed that leave torch's global random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global generators under `seed` inside the block; every generator gets
    its state back after: the CPU's and, once CUDA has started, each CUDA device's
    (`torch.manual_seed` seeds them all). Before CUDA starts only the CPU's is seeded, so that
    no seed is queued for CUDA to take when it starts.

    For what takes only the global generators: sampling in `generate`, PEFT's initialisations.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        if cuda:
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield
