"""Reptile and the pretrain-then-fine-tune baseline.

Reptile (Nichol et al. 2018, arXiv 1803.02999, Algorithm 2): adapt θ to each task of a batch
by k SGD steps, giving W_i, then move θ toward their mean,

    θ ← θ + ε (1/n) Σ_i (W_i − θ).

Here g = θ − mean_i W_i is handed to Adam as the gradient, as the paper suggests (Sec. 3).

The baseline of MAML Sec. 5.1 ("pretrained"): one network trained on the union of all tasks'
points, L(f_θ(x), y) over every task at once, then fine-tuned on each test task's support set.

Both meta-test by adapting on the support set (`adapted_predict`), as MAML does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lfm.meta.functional import (
    MetaConfig,
    Params,
    Task,
    adapted_predict,
    forward,
    inner_adapt,
    over_tasks,
)
from lfm.meta.tiny import data_example
from lfm.meta.train import Outer, register_learner


class ReptileConfig(MetaConfig):
    """Reptile with SGD inner steps and Adam on the Reptile direction."""

    inner_lr: float = 0.01  # inner SGD step size (sinusoid scale of MAML Sec. 5.1)
    inner_steps: int = 5  # k inner steps per task (Reptile Omniglot/Mini-ImageNet: 5)
    first_order: bool = True  # Reptile never differentiates through the inner loop
    meta_batch: int = 5  # tasks per outer step (Reptile Omniglot: 5)


class PretrainConfig(MetaConfig):
    """Joint training on all tasks, fine-tuning at test (MAML Sec. 5.1 baseline)."""

    inner_steps: int = 0  # no adaptation while training: one model fits all tasks' points


def reptile_objective(
    model: nn.Module,
    params: Params,
    tasks: Task,
    problem: Any,
    cfg: ReptileConfig,
    lrs: Params | None,
    vectorize: bool,
) -> Outer:
    """Reptile's update direction g = θ − mean_i W_i and the mean post-adaptation query loss."""
    base = {n: p.detach() for n, p in params.items()}

    def one(task: Task) -> tuple[Params, Tensor]:
        fast = inner_adapt(model, base, problem.loss, (task.xs, task.ys), cfg, first_order=True)
        loss = problem.loss(forward(model, fast, task.xq), task.yq)
        return {n: base[n] - fast[n] for n in base}, loss.detach()

    with torch.no_grad():
        deltas, losses = over_tasks(one, tasks, vectorize)
    return Outer(losses.mean(), {n: d.mean(0) for n, d in deltas.items()})


def pretrain_objective(
    model: nn.Module,
    params: Params,
    tasks: Task,
    problem: Any,
    cfg: PretrainConfig,
    lrs: Params | None,
    vectorize: bool,
) -> Outer:
    """Loss of one network on every point of every task (no adaptation)."""

    def one(task: Task) -> Tensor:
        x, y = torch.cat([task.xs, task.xq]), torch.cat([task.ys, task.yq])
        return problem.loss(forward(model, params, x), y)

    return Outer(over_tasks(one, tasks, vectorize).mean())


reptile = register_learner(
    "reptile", objective=reptile_objective, predict=adapted_predict,
    branch="meta-learning from data", config=ReptileConfig,
    paper="Nichol et al. 2018, arXiv 1803.02999", example=data_example(ReptileConfig),
    cli="lfm meta train --method reptile",
)  # fmt: skip
pretrain = register_learner(
    "pretrain", objective=pretrain_objective, predict=adapted_predict,
    branch="meta-learning from data", config=PretrainConfig,
    paper="Finn et al. 2017, arXiv 1703.03400 (pretrained baseline, Sec. 5.1)",
    example=data_example(PretrainConfig), cli="lfm meta train --method pretrain",
)  # fmt: skip
