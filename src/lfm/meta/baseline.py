"""Train-then-fine-tune baselines for few-shot classification.

"Baseline" of Chen et al. 2019 (A Closer Look at Few-shot Classification, arXiv 1904.04232):
train a classifier with cross-entropy on all meta-train classes at once, then, for each test
episode, replace its last layer by a new N-way linear head and fit that head on the support set,

    W* = argmin_W Σ_{(x, y) ∈ S} CE(W f_θ(x), y),   f_θ frozen.

The same pieces train the pool models of data-free meta-learning (`lfm.meta.datafree`) and give
its baseline (fine-tune one pool model on the support set).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lfm.core import placement
from lfm.meta.maml import ANILConfig


class FinetuneConfig(ANILConfig):
    """Meta-test settings of the baseline: SGD on a new zero-initialised head, which is ANIL's
    adaptation (`meta_test(fresh_head(model, ways), tasks, "anil", FinetuneConfig())`)."""

    inner_lr: float = 0.5  # SGD step size on the new head
    test_inner_steps: int = 20  # SGD steps on the support set at meta-test
    inner_params: tuple[str, ...] = ("head",)  # Baseline (Chen et al.): the head only


def class_data(sampler: Any) -> tuple[Tensor, Tensor]:
    """All examples of an `EpisodeTasks` split, labelled 0..C−1 in the order of its classes."""
    ys = [torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(sampler.pools)]
    return torch.cat(sampler.pools), torch.cat(ys)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 200,
    lr: float = 1e-3,
    batch: int = 64,
    seed: int = 0,
    tick: Callable[[int], Any] | None = None,
) -> nn.Module:
    """A copy of `model` trained by Adam on minibatch cross-entropy; returned in eval mode, on
    the loop's device (`lfm.core.placement.loop_device`).

    Args:
        model: the classifier (its outputs must cover the labels of `y`).
        x: inputs (M, ...).
        y: labels (M,).
        steps: Adam steps.
        lr: Adam step size.
        batch: examples per step.
        seed: seeds the minibatch order.
        tick: called with 1 after every step (a progress bar's `update`).
    """
    device = placement.loop_device(model)  # the chosen `--device`, else where `model` is
    model = copy.deepcopy(model).to(device).train()
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (min(batch, len(y)),), generator=gen).to(device)
        with placement.autocast(device):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if tick is not None:
            tick(1)
    return model.eval()


def fresh_head(model: nn.Module, ways: int) -> nn.Module:
    """A copy of `model` in train mode whose `head` is a new zero-initialised `ways`-way layer.

    Zero weights give every class the same logit before fine-tuning, so the starting point does
    not depend on how an episode's labels were permuted.
    """
    model = copy.deepcopy(model).train()
    head = nn.Linear(model.head.in_features, ways)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.head = head
    return model


def class_groups(n_classes: int, n_models: int, ways: int, seed: int) -> list[list[int]]:
    """`n_models` subsets of `ways` classes, disjoint while the classes last, then reshuffled."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_models * ways:
        order += torch.randperm(n_classes, generator=gen)[: n_classes - n_classes % ways].tolist()
    return [sorted(order[i * ways : (i + 1) * ways]) for i in range(n_models)]


def train_pool(
    sampler: Any,
    make_model: Any,
    n_models: int = 4,
    ways: int = 5,
    steps: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> list[nn.Module]:
    """A pool of `ways`-way classifiers, each trained on its own classes of `sampler`'s split.

    Args:
        sampler: an `EpisodeTasks` over the meta-train classes.
        make_model: `make_model() -> nn.Module` with `ways` outputs.
        n_models: pool size.
        ways: classes per pool model.
        steps: Adam steps per model.
        seed: seeds the class subsets, the initialisations and the minibatches.
        progress: show a progress bar over the steps of all the models.
    """
    pool = []
    bar = tqdm(total=n_models * steps, desc="pool", disable=not progress, leave=False)
    for i, group in enumerate(class_groups(len(sampler.pools), n_models, ways, seed)):
        x = torch.cat([sampler.pools[c] for c in group])
        y = torch.arange(ways).repeat_interleave(
            torch.tensor([len(sampler.pools[c]) for c in group])
        )
        torch.manual_seed(seed * 1000 + i)
        pool.append(
            train_classifier(make_model(), x, y, steps=steps, seed=seed * 1000 + i, tick=bar.update)
        )
    bar.close()
    return pool
