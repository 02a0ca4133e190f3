"""The tiny problems behind the registry's examples of reuse methods (`registry.Example`).

Every model is a seeded `TinyMLP` from `lfm.core.tiny` (8 inputs, 16 hidden units, 3 classes)
wrapped in a `LocalClassifier` and narrowed to the level asked for, so the contract test can run a
method through handles of exactly its level and refuse it one level below. The white-box modules
are returned too: statistics a data-aware merge reads (Fisher, Gram matrices, learned
coefficients) are computed from them in code, before the method sees only its handles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lfm.access import Access, LocalClassifier, narrow
from lfm.config import Config
from lfm.core.tiny import tiny_mlp
from lfm.registry import Example

# (base module, model modules, seed) -> the `stats` a data-aware kernel reads
Stats = Callable[[nn.Module, list[nn.Module], int], dict[str, Any]]


def classifiers(level: Access, seeds: Sequence[int]) -> tuple[list[nn.Module], list[Any]]:
    """Seeded tiny MLPs and handles over them that give `level` access."""
    modules = [tiny_mlp(seed=s) for s in seeds]
    pairs = zip(modules, seeds, strict=True)
    handles = [narrow(LocalClassifier(m, name=f"mlp{s}"), level) for m, s in pairs]
    return modules, handles


def batch(seed: int, n: int = 16) -> Tensor:
    """A seeded batch of inputs (n, 8) for the tiny MLPs."""
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def merge_example(
    n: int = 3, base: bool = True, cfg: Config | None = None, stats: Stats | None = None
) -> Callable[[Access, int], Example]:
    """An example for a kernel: `run("reuse/<name>", models, base=..., stats=...)` over `n`
    tiny MLPs (seeds seed+1 ... seed+n) onto a base (seed), all narrowed to the level."""

    def build(level: Access, seed: int) -> Example:
        modules, handles = classifiers(level, [seed + i for i in range(n + 1)])
        kwargs: dict[str, Any] = {"base": handles[0]} if base else {}
        if stats is not None:
            kwargs["stats"] = stats(modules[0], modules[1:], seed)
        return Example((handles[1:],), kwargs, cfg)

    return build
