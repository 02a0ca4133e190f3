"""AdaMerging (Yang et al. 2023, arXiv 2310.02575): merging coefficients learned without labels.

Task arithmetic with one coefficient per task (task-wise) or per task and layer (layer-wise):

    θ_l(λ) = θ_b,l + Σ_k λ_{k,l} τ_{k,l},      τ_k = θ_k − θ_b

λ is learned by minimising the Shannon entropy H(softmax(f(x; θ(λ)))) of the merged model's
predictions on unlabelled test inputs of every task (the paper's surrogate for the loss), with
Adam from λ = 0.3. Each parameter tensor is one "layer". When tasks have their own heads (which
are not merged), `heads[k]` maps the merged model's output to task k's logits.

Learning needs the model and data (`learn_coefficients`); the merge itself is a per-tensor kernel
(`adamerging`) that reads the learned coefficients from a file or from memory and streams through
the one driver like any other method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from lfm.access import Access
from lfm.config import Config
from lfm.core.io import load_tensors
from lfm.registry import register
from lfm.reuse import kernels as K
from lfm.reuse.contract import KERNEL
from lfm.reuse.driver import Ctx, Inputs, MergeError
from lfm.reuse.examples import batch, merge_example
from lfm.reuse.stats import FORMAT, save_stats


class AdaMergingConfig(Config):
    granularity: Literal["layer", "task"] = "layer"  # λ per (task, tensor) or per task
    init: float = 0.3  # initial λ, and λ for tensors without learned coefficients (paper: 0.3)
    lr: float = Field(1e-3, gt=0)  # Adam learning rate (paper: 1e-3)
    steps: int = Field(500, ge=0)  # optimisation steps, one batch per task each (paper: 500)
    clamp: bool = True  # keep λ in [0, 1]
    coefficients: str | None = None  # a learned-coefficients file for the merge (or in memory)


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax of logits (B, C)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def _learned_names(model: nn.Module, sd: Mapping[str, Tensor]) -> list[str]:
    """The float tensors of `sd` that are parameters of `model` (buffers get no coefficients)."""
    params = dict(model.named_parameters())
    return [k for k, v in sd.items() if v.is_floating_point() and k in params]


def merged_params(
    base: Mapping[str, Tensor], taus: list[dict[str, Tensor]], lam: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """θ_b + Σ_k λ_{k,l} τ_k for each name l (λ (L, K), or (1, K) shared by every name)."""
    out = dict(base)
    for row, name in enumerate(names):
        coef = lam[row if lam.shape[0] > 1 else 0]
        out[name] = base[name] + sum(c * t[name] for c, t in zip(coef, taus, strict=True))
    return out


def learn_coefficients(
    model: nn.Module,
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    batches: Sequence[Sequence[Tensor]],
    cfg: AdaMergingConfig | None = None,
    heads: Sequence[Callable[[Tensor], Tensor]] | None = None,
) -> tuple[dict[str, Tensor], list[float]]:
    """Learn merging coefficients by entropy minimisation on unlabelled inputs.

    Args:
        model: a module of the merged architecture (its own weights are not used or changed).
        base: the base (pretrained) state dict.
        models: the fine-tuned state dicts, one per task.
        batches: per task, a list of unlabelled input batches (cycled over the steps).
        cfg: steps, learning rate, granularity (paper defaults).
        heads: per task, a function from the model's output to that task's logits.

    Returns:
        Name -> λ (K,) for each float parameter, and the summed entropy at each step (before its
        update). Float buffers (BatchNorm running statistics) learn no λ: they are merged with
        λ = `cfg.init`, during learning as in the merge.
    """
    cfg = cfg or AdaMergingConfig()
    names = _learned_names(model, base)
    fixed = [k for k, v in base.items() if v.is_floating_point() and k not in names]
    base = {k: v.detach().float() if k in names else v for k, v in base.items()}
    init = torch.full((1, len(models)), cfg.init)
    base.update(merged_params(base, [{n: m[n].float() - base[n] for n in fixed} for m in models],
                              init, fixed))  # fmt: skip
    taus = [{n: m[n].detach().float() - base[n] for n in names} for m in models]
    rows = len(names) if cfg.granularity == "layer" else 1
    lam = torch.full((rows, len(models)), cfg.init, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=cfg.lr)
    history: list[float] = []
    for step in range(cfg.steps):
        params = merged_params(base, taus, lam, names)
        tasks = range(len(models))
        loss = sum(_task_entropy(model, params, batches, heads, k, step) for k in tasks)
        history.append(_update(opt, lam, loss, cfg.clamp))  # type: ignore[arg-type]
    lam = lam.detach()
    return {n: lam[i if rows > 1 else 0].clone() for i, n in enumerate(names)}, history


def _update(opt: torch.optim.Optimizer, lam: Tensor, loss: Tensor, clamp: bool) -> float:
    """One Adam step on λ (kept in [0, 1] when `clamp`); returns the loss before the step."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    if clamp:
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
    return float(loss.detach())


def _task_entropy(model, params, batches, heads, k: int, step: int) -> Tensor:
    x = batches[k][step % len(batches[k])]
    out = functional_call(model, params, (x,))
    return entropy(heads[k](out) if heads is not None else out)


def save_coefficients(path: str | Path, coefficients: Mapping[str, Tensor]) -> Path:
    """Write learned coefficients (name -> λ (K,)) atomically as a statistics file of kind
    `adamerging`, for the `coefficients` field of a merge plan."""
    return save_stats(path, coefficients, "adamerging")


def load_coefficients(path: str | Path) -> dict[str, Tensor]:
    """Coefficients written by `save_coefficients` (another kind of file is refused)."""
    tensors, meta = load_tensors(path, FORMAT)
    if meta.get("kind") != "adamerging":
        raise MergeError(f"{path} holds {meta.get('kind')} statistics, not AdaMerging coefficients")
    return tensors


def _open_coefficients(inputs: Inputs, cfg: Any) -> dict[str, Any]:
    if cfg.coefficients is None:
        return {}
    return {"coefficients": load_coefficients(cfg.coefficients)}  # one λ (K,) per tensor: small


def _coefficients_example(base: nn.Module, models: list[nn.Module], seed: int) -> dict[str, Any]:
    """Coefficients learned in a few steps on unlabelled inputs of two tasks."""
    base_sd, sds = base.state_dict(), [m.state_dict() for m in models]
    data = [[batch(seed + k)] for k in range(len(models))]
    cfg = AdaMergingConfig(steps=3, lr=0.05)
    return {"coefficients": learn_coefficients(base, base_sd, sds, data, cfg)[0]}


@register(
    "reuse", "adamerging", shape=KERNEL, branch="straightforward optimisation",
    access=Access.WEIGHTS, config=AdaMergingConfig, paper="Yang et al. 2023, arXiv 2310.02575",
    example=merge_example(n=2, stats=_coefficients_example),
    cli="lfm reuse merge PLAN.yaml (method: adamerging; coefficients: a file of "
    "save_coefficients: learning them needs the model, task heads and data, in Python)",
    prepare=_open_coefficients,
)  # fmt: skip
def adamerging(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """θ_b + Σ_k w_k λ_k τ_k with this tensor's learned λ (cfg.init where none was learned)."""
    assert base is not None
    coef = ctx.stats.get("coefficients", {}).get(ctx.name)
    lam = [cfg.init] * (max(ctx.models) + 1) if coef is None else coef.tolist()
    scaled = [w * lam[i] for w, i in zip(weights, ctx.models, strict=True)]
    return K.task_merge(base, K.task_vectors(base, tensors), scaled, scale=1.0)
