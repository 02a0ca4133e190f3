"""Meta-training and meta-testing loops shared by every meta-learner.

The outer loop of MAML (Finn et al. 2017, arXiv 1703.03400, Algorithm 1):

    θ ← θ − β ∇_θ Σ_{T_i ~ p(T)} L_{T_i}(f_{θ'_i})

run with Adam. Each registered method supplies its objective `fn(model, params, tasks, problem,
cfg, lrs, vectorize) -> Outer`: a loss to differentiate, or (Reptile) the update direction
itself. Meta-test adapts to each held-out task and reports mean ± 1.96·std/√n.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from lfm.config import Config
from lfm.errors import LfmError
from lfm.meta.functional import (
    OuterConfig,
    Params,
    Task,
    can_vectorize,
    over_tasks,
    params_of,
    selected,
)


class Outer(NamedTuple):
    """What one meta-batch gives the outer optimiser."""

    loss: Tensor  # the meta-loss (logged; differentiated when `grads` is None)
    grads: Params | None = None  # an explicit update direction per parameter (Reptile)


@dataclass
class History:
    """Meta-training record."""

    loss: list[float] = field(default_factory=list)  # meta-loss per outer step
    inner_lrs: Params | None = None  # learned per-parameter step sizes (Meta-SGD)


def query_objective(
    model: nn.Module,
    params: Params,
    tasks: Task,
    problem: Any,
    cfg: Any,
    lrs: Params | None,
    vectorize: bool,
) -> Outer:
    """Mean query loss after each task's adaptation (MAML, FOMAML, ANIL, Meta-SGD, ProtoNets)."""

    def one(task: Task) -> Tensor:
        return problem.loss(cfg.predict(model, params, task, problem, cfg, lrs, True), task.yq)

    return Outer(over_tasks(one, tasks, vectorize).mean())


def spec_for(cfg: Config) -> Any:
    """The registered meta method whose config class is `type(cfg)`."""
    from lfm.registry import methods

    hits = [s for s in methods("meta") if type(cfg) is s.config]
    if not hits:
        raise LfmError(f"no meta method is configured by {type(cfg).__name__}")
    return hits[0]


def init_lrs(params: Params, cfg: Any) -> Params | None:
    """Meta-SGD's step sizes, one per adapted parameter entry, initialised to `inner_lr`."""
    if not getattr(cfg, "learn_inner_lr", False):
        return None
    names = selected(params, cfg.inner_params)
    return {n: torch.full_like(params[n], cfg.inner_lr).requires_grad_() for n in names}


def _set_grads(out: Outer, params: Params, lrs: Params | None) -> None:
    leaves = {**params, **{f"lr:{n}": t for n, t in (lrs or {}).items()}}
    if out.grads is not None:
        for n, p in params.items():
            p.grad = out.grads[n].detach().clone()
        return
    gs = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
    for p, g in zip(leaves.values(), gs, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g


def meta_train(
    model: nn.Module, sampler: Any, cfg: OuterConfig, seed: int = 0, progress: bool = False
) -> tuple[nn.Module, History]:
    """Meta-train a copy of `model` on tasks from `sampler`; the caller's model is not changed.

    Args:
        model: the network whose initialisation is meta-learned.
        sampler: gives `sample(n, generator) -> Task` and `problem`.
        cfg: a registered meta method's config; its class picks the method.
        seed: seeds the task stream.
        progress: show a progress bar.

    Returns:
        The meta-trained copy and its `History`.
    """
    spec = spec_for(cfg)
    model = copy.deepcopy(model)
    params = params_of(model)
    lrs = init_lrs(params, cfg)
    opt = torch.optim.Adam([*params.values(), *(lrs or {}).values()], lr=cfg.outer_lr)
    gen = torch.Generator().manual_seed(seed)
    vec = can_vectorize(model, cfg.vectorize)
    history = History()
    for _ in trange(cfg.steps, disable=not progress, desc=spec.key, leave=False):
        out = spec.fn(
            model, params, sampler.sample(cfg.meta_batch, gen), sampler.problem, cfg, lrs, vec
        )
        _set_grads(out, params, lrs)
        opt.step()
        history.loss.append(float(out.loss.detach()))
    history.inner_lrs = {n: t.detach() for n, t in lrs.items()} if lrs else None
    return model, history


def summarise(scores: Tensor) -> dict[str, float]:
    """Mean and 95 % interval half-width 1.96·std/√n of per-task scores."""
    n = scores.numel()
    std = float(scores.std()) if n > 1 else 0.0
    return {"mean": float(scores.mean()), "ci95": 1.96 * std / math.sqrt(n), "n": n}


def meta_test(
    model: nn.Module,
    sampler: Any,
    cfg: Any,
    n_tasks: int = 600,
    seed: int = 12345,
    inner_lrs: Params | None = None,
    chunk: int = 10,
) -> dict[str, float]:
    """Adapt to `n_tasks` held-out tasks and score their queries (MSE or accuracy).

    Tasks are drawn and adapted `chunk` at a time (one `vmap` call each); the draws do not depend
    on `chunk`, which only bounds memory (100 episodes of 28×28 images under one `vmap` allocate
    hundreds of MB per layer, and the allocator's page faults then cost more than the maths).

    Returns:
        `{"mean", "ci95", "n", "metric"}`.
    """
    params = {n: p.detach() for n, p in params_of(model).items()}
    gen = torch.Generator().manual_seed(seed)
    vec = can_vectorize(model, cfg.vectorize)
    problem, scores = sampler.problem, []

    def one(task: Task) -> Tensor:
        return problem.metric(
            cfg.predict(model, params, task, problem, cfg, inner_lrs, False), task.yq
        )

    for start in range(0, n_tasks, chunk):
        tasks = sampler.sample(min(chunk, n_tasks - start), gen)
        scores.append(over_tasks(one, tasks, vec).detach())
    return {**summarise(torch.cat(scores)), "metric": problem.metric_name}  # type: ignore[dict-item]


def smoke_run(cfg: OuterConfig, seed: int, classification: bool = False) -> dict[str, Any]:
    """Meta-train 3 steps on a tiny problem and meta-test on 4 tasks (the registry contract)."""
    from lfm.meta.models import MLP
    from lfm.meta.tasks import EpisodeTasks, SinusoidTasks

    torch.manual_seed(seed)
    cfg = cfg.replace(steps=3, meta_batch=2)
    if classification:
        means = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed)) * 3
        y = torch.arange(6).repeat_interleave(5)
        x = means[y] + torch.randn(30, 4)
        model, sampler = MLP(4, 3, (8,)), EpisodeTasks(x, y, range(6), ways=3, shots=2, queries=2)
    else:
        model, sampler = MLP(1, 1, (8, 8)), SinusoidTasks(shots=3, queries=3)
    trained, hist = meta_train(model, sampler, cfg, seed=seed)
    score = meta_test(trained, sampler, cfg, n_tasks=4, seed=seed, inner_lrs=hist.inner_lrs)
    return {
        "loss": torch.tensor(hist.loss),
        "head": trained.head.weight.detach(),
        "score": score["mean"],
    }
