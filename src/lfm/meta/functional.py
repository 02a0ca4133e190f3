"""The functional inner loop shared by the gradient-based meta-learners.

Parameters are a dict `name -> tensor`; a model runs on them through
`torch.func.functional_call` and is never modified in place. One inner step of MAML
(Finn et al. 2017, arXiv 1703.03400, Eq. 1) on the support set of task T_i:

    θ'_i = θ − α ∘ ∇_θ L_{T_i}(f_θ)

with α a scalar (MAML) or one learned step size per parameter entry (Meta-SGD, Li et al. 2017,
arXiv 1707.09835, Eq. 3). The gradient is taken with `torch.func.grad`, so the same code runs for
one task or under `torch.func.vmap` over a meta-batch, and an outer loss differentiates through
it (second order) unless `first_order` detaches it (FOMAML). Restricting θ to a named subset, the
head only, gives ANIL (Raghu et al. 2019, arXiv 1909.09157).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Self

import torch
from pydantic import model_validator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from lfm.config import Config
from lfm.errors import LfmError

Params = dict[str, Tensor]
Selector = Callable[[str], bool] | Sequence[str] | None
LossFn = Callable[[Tensor, Tensor], Tensor]


class Task(NamedTuple):
    """One task (or, with a leading task dimension T, a meta-batch of tasks)."""

    xs: Tensor  # support inputs   (K, ...)  or (T, K, ...)
    ys: Tensor  # support targets  (K, ...)  or (T, K, ...)
    xq: Tensor  # query inputs     (Q, ...)  or (T, Q, ...)
    yq: Tensor  # query targets    (Q, ...)  or (T, Q, ...)


def on(tasks: Task, device: torch.device) -> Task:
    """The task (or meta-batch) with its tensors on `device` (samplers draw on the CPU)."""
    return Task(*(t.to(device) for t in tasks))


# The range of each number a meta config may hold, checked for every subclass (whose own defaults
# redefine these fields, dropping any `Field` bound of the parent). Counts: the least value (0 steps
# meta-tests the initialisation; 0 inner steps adapts nothing). Rates, the temperature and the
# finite-difference step: above 0. Loss weights: at least 0.
AT_LEAST = {
    "meta_batch": 1, "steps": 0, "inner_steps": 0, "test_inner_steps": 0, "ways": 1, "shots": 1,
    "queries": 1, "inv_steps": 0, "directions": 1,
    "bn": 0.0, "tv": 0.0, "adv": 0.0, "kd": 0.0,
}  # fmt: skip
ABOVE = {"outer_lr": 0.0, "inner_lr": 0.0, "inv_lr": 0.0, "temperature": 0.0, "mu": 0.0}


class OuterConfig(Config):
    """Fields every meta-learner shares: the outer loop."""

    outer_lr: float = 1e-3  # β: Adam step size of the meta-update (MAML Sec. 5)
    meta_batch: int = 25  # tasks per meta-update (MAML sinusoid: 25)
    steps: int = 1000  # meta-updates (0: meta-test the initialisation); papers run 15k-70k
    vectorize: Literal["auto", "always", "never"] = (
        "auto"  # vmap over tasks; auto: not with train-mode nn.BatchNorm
    )

    @model_validator(mode="after")
    def _counts(self) -> Self:
        low = [f"{k} must be at least {v}" for k, v in AT_LEAST.items() if getattr(self, k, v) < v]
        low += [f"{k} must be > {v}" for k, v in ABOVE.items() if not getattr(self, k, v + 1) > v]
        if low:
            raise ValueError("; ".join(low))
        return self


class MetaConfig(OuterConfig):
    """Fields of the gradient-based (MAML family) learners; MAML sinusoid defaults."""

    inner_lr: float = 0.01  # α: inner step size (MAML: 0.01 sinusoid, 0.4 Omniglot 5-way)
    inner_steps: int = 1  # inner gradient steps during meta-training (MAML: 1)
    test_inner_steps: int = 10  # inner steps at meta-test (MAML Fig. 2 shows up to 10)
    first_order: bool = False  # drop the second-order term (FOMAML, MAML Sec. 5.2)
    inner_params: tuple[str, ...] = ()  # names or prefixes adapted in the inner loop; () = all
    learn_inner_lr: bool = False  # Meta-SGD: learn one step size per parameter entry


def params_of(model: nn.Module) -> Params:
    """The model's parameters as a name -> tensor dict (the tensors themselves, not copies)."""
    return dict(model.named_parameters())


def selected(names: Sequence[str] | Params, select: Selector) -> list[str]:
    """Names kept by `select`: a predicate, or names/prefixes (`"head"` keeps `head.weight`)."""
    names = list(names)
    if select is None or (not callable(select) and len(select) == 0):
        return names
    if callable(select):
        keep = [n for n in names if select(n)]
    else:
        prefixes = tuple(select)
        keep = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not keep:
        raise LfmError(f"no parameter matches {select!r}; names are {names[:6]}...")
    return keep


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Run `model` on `params` without touching its own parameters or buffers.

    Buffers are passed as fresh copies: BatchNorm in train mode normalises by batch statistics
    (as MAML does) and its running-stat updates land on the copies, since a `grad` transform
    refuses in-place writes to tensors it did not create.
    """
    fast = getattr(model, "functional", None)  # a model that writes its forward out (`MLP`)
    out = fast(params, x) if fast is not None else None
    if out is not None:
        return out
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


def _support_loss(
    fast: Params, model: nn.Module, params: Params, loss_fn: LossFn, x: Tensor, y: Tensor
) -> Tensor:
    return loss_fn(forward(model, {**params, **fast}, x), y)


def _step(lr: float | Params, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, dict) else lr


def inner_adapt(
    model: nn.Module,
    params: Params,
    loss_fn: LossFn,
    support: tuple[Tensor, Tensor],
    cfg: MetaConfig,
    *,
    lrs: Params | None = None,
    steps: int | None = None,
    first_order: bool | None = None,
    select: Selector = None,
) -> Params:
    """Adapt `params` to one task's support set by gradient steps; returns new params.

    Args:
        model: the network; only its structure (and buffers) is used.
        params: the meta-parameters θ (name -> tensor).
        loss_fn: `loss_fn(prediction, target) -> scalar`.
        support: `(x, y)` of the task's support set.
        cfg: step size, step count, first-order flag and adapted subset.
        lrs: per-parameter step sizes (Meta-SGD); overrides `cfg.inner_lr`.
        steps: overrides `cfg.inner_steps` (meta-test uses more steps).
        first_order: overrides `cfg.first_order`.
        select: a predicate or names/prefixes of the adapted subset; overrides `cfg.inner_params`.
    """
    x, y = support
    steps = cfg.inner_steps if steps is None else steps
    detach = cfg.first_order if first_order is None else first_order
    lr: float | Params = cfg.inner_lr if lrs is None else lrs
    names = selected(params, select if select is not None else cfg.inner_params)
    for _ in range(steps):
        fast = {n: params[n] for n in names}
        g = grad(_support_loss)(fast, model, params, loss_fn, x, y)
        g = {n: t.detach() for n, t in g.items()} if detach else g
        params = {**params, **{n: fast[n] - _step(lr, n) * g[n] for n in names}}
    return params


def can_vectorize(model: nn.Module, setting: str) -> bool:
    """Whether to vmap over tasks. Not with `nn.BatchNorm` in train mode: with running statistics
    it mutates buffers, and without them the fused batch-norm backward gives wrong second-order
    gradients under `vmap` (torch 2.13), so both run a loop. `models.BatchStatNorm2d` vmaps."""
    if setting != "auto":
        return setting == "always"
    return not any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


def _stack(outs: list[Any]) -> Any:
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    if isinstance(outs[0], tuple):
        return tuple(_stack(list(col)) for col in zip(*outs, strict=True))
    return torch.stack(outs)


def over_tasks(fn: Callable[[Task], Any], tasks: Task, vectorize: bool) -> Any:
    """Apply `fn` to each task of a meta-batch: one `vmap` call, or a Python loop."""
    if vectorize:
        return vmap(lambda *t: fn(Task(*t)))(*tasks)
    return _stack([fn(Task(*(t[i] for t in tasks))) for i in range(tasks.xs.shape[0])])


def adapted_predict(
    model: nn.Module,
    params: Params,
    task: Task,
    problem: Any,
    cfg: MetaConfig,
    lrs: Params | None,
    train: bool,
) -> Tensor:
    """Adapt on `task`'s support set, then predict its queries.

    Args:
        model: the network.
        params: meta-parameters θ.
        task: one task (no leading task dimension).
        problem: the sampler's `Problem` (its `loss` drives the inner loop).
        cfg: the learner's config.
        lrs: learned per-parameter step sizes (Meta-SGD) or None.
        train: meta-training (`inner_steps`, second order unless `first_order`) or meta-test
            (`test_inner_steps`, first order: nothing differentiates through it).
    """
    steps = cfg.inner_steps if train else cfg.test_inner_steps
    first = cfg.first_order or not train
    fast = inner_adapt(
        model,
        params,
        problem.loss,
        (task.xs, task.ys),
        cfg,
        lrs=lrs,
        steps=steps,
        first_order=first,
    )
    return forward(model, fast, task.xq)
