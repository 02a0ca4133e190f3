"""Tiny meta-learning problems built in code: the registry's examples of every meta method.

Each runs in well under a second: a small MLP meta-trained for 3 outer steps on sinusoids or on
Gaussian-blob episodes (the data-free learners build a pool of blob classifiers, in
`lfm.meta.datafree`), then meta-tested on 4 tasks. The handles are narrowed to the level the
contract test asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lfm.access import Access, LocalClassifier, narrow
from lfm.config import Config
from lfm.meta.contract import MetaResult
from lfm.meta.models import MLP
from lfm.meta.tasks import EpisodeTasks, SinusoidTasks
from lfm.meta.train import meta_test
from lfm.registry import Example


def summary_of(sampler: Any, cfg: Config, seed: int) -> Callable[[MetaResult], dict[str, Any]]:
    """The meta-loss curve, the trained head and the meta-test score on 4 tasks."""

    def summary(result: MetaResult) -> dict[str, Any]:
        score = meta_test(result, sampler, cfg=cfg, n_tasks=4, seed=seed)
        loss = torch.tensor(result.history.loss)
        return {"loss": loss, "head": result.model.head.weight.detach(), "score": score["mean"]}

    return summary


def blobs(seed: int, classes: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in [0, 1]^4 around one random centre per class, and their labels."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(classes, 4, generator=gen)
    y = torch.arange(classes).repeat_interleave(per_class)
    return (means[y] + 0.05 * torch.randn(len(y), 4, generator=gen)).clamp(0, 1), y


def data_example(
    config: type[Config], classification: bool = False
) -> Callable[[Access, int], Example]:
    """`example(level, seed)`: a learner from data on sinusoids (or 3-way blob episodes)."""

    def example(level: Access, seed: int) -> Example:
        torch.manual_seed(seed)
        if classification:
            x, y = blobs(seed, 6, 5)
            model, sampler = MLP(4, 3, (8,)), EpisodeTasks(x, y, range(6), 3, shots=2, queries=2)
        else:
            model, sampler = MLP(1, 1, (8, 8)), SinusoidTasks(shots=3, queries=3)
        cfg = config(steps=3, meta_batch=2)
        handle = narrow(LocalClassifier(model), level)
        return Example((handle, sampler), cfg=cfg, summary=summary_of(sampler, cfg, seed))

    return example
