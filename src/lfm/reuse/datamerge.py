"""Data-aware merging from saved statistics: Fisher merging and RegMean, through the one driver.

- Fisher merging (Matena & Raffel 2021, arXiv 2111.09832), per parameter entry:
      θ = Σ_i w_i F_i θ_i / Σ_i w_i F_i       (F_i floored at `eps`, so zero Fisher gives an average)
- RegMean (Jin et al. 2022, arXiv 2212.09849), per linear layer y = x Wᵀ, the minimiser of
  Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² in closed form:
      Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,   G̃_i = α G_i + (1 − α) diag(G_i),   G_i = X_iᵀ X_i
  with α the shrink of the off-diagonal entries (paper default 0.9); every other tensor is averaged.
  A conv layer is the same regression on its unfolded input patches, solved per group (a
  depthwise conv: one small system per channel).

Statistics come from files written by `stats.py` (one per model, in model order, named by the
config's `stats`, so merge plans and the streaming engine use them), or from tensors held in memory
(`merge_state_dicts(..., stats={"per_model": [...]})`). Either way a kernel reads one statistic
tensor per model and parameter, so memory stays bounded by the driver's streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from lfm.access import Access
from lfm.config import Config
from lfm.registry import register
from lfm.reuse import kernels as K
from lfm.reuse.contract import KERNEL
from lfm.reuse.driver import Ctx, Inputs, MergeError
from lfm.reuse.examples import batch, merge_example
from lfm.reuse.stats import fisher as fisher_stats
from lfm.reuse.stats import gram, stats_meta


class FisherConfig(Config):
    stats: tuple[str, ...] = ()  # one Fisher file per model (empty: given in memory)
    eps: float = Field(1e-8, ge=0)  # floor on each Fisher entry (the paper's ε)


class RegMeanConfig(Config):
    stats: tuple[str, ...] = ()  # one Gram file per model (empty: given in memory)
    alpha: float = Field(0.9, ge=0, le=1)  # scale of the off-diagonal Gram entries (paper: 0.9)
    ridge: float = Field(0.0, ge=0)  # added to the diagonal of Σ G̃_i (0: plain least squares)


class _FileStats:
    """Lazy tensors of one statistics file of a given kind, read one name at a time (a Fisher
    file of a large model is as large as the model: the driver reads one tensor at a time)."""

    def __init__(self, path: str, kind: str):
        from lfm.reuse.engine import SafetensorsReader

        self.meta = stats_meta(path, kind)  # refuses another format or kind in one line
        self.reader = SafetensorsReader(path)
        self.names = set(self.reader.keys())

    def get(self, name: str) -> Tensor | None:
        return self.reader.get(name) if name in self.names else None


class _MemStats:
    """Statistics held in memory: a name -> tensor mapping and optional orientations."""

    def __init__(self, table: Mapping[str, Tensor], orientation: Mapping[str, str] | None = None):
        self.table, self.meta = table, {"orientation": dict(orientation or {})}

    def get(self, name: str) -> Tensor | None:
        return self.table.get(name)


def _opener(kind: str) -> Callable[[Inputs, Any], dict[str, Any]]:
    """The `prepare` pass of a data-aware kernel: open the config's statistics files of `kind`."""

    def prepare(inputs: Inputs, cfg: Any) -> dict[str, Any]:
        if not cfg.stats:
            return {}
        if len(cfg.stats) != len(inputs.models):
            raise MergeError(f"{len(cfg.stats)} statistics files for {len(inputs.models)} models")
        return {"per_model": [_FileStats(p, kind) for p in cfg.stats]}

    return prepare


def _per_model(ctx: Ctx) -> list[Any]:
    stats = ctx.stats.get("per_model")
    if stats is None:
        raise MergeError("this merge needs statistics: give `stats` files in the config")
    return [s if hasattr(s, "get") and hasattr(s, "meta") else _MemStats(s) for s in stats]


def fisher_merge(ts: list[Tensor], fs: list[Tensor], ws: list[float], eps: float) -> Tensor:
    """Σ w_i F_i θ_i / Σ w_i F_i with F_i ≥ eps (a weighted average where no model has Fisher).

    Each F_i (read on the CPU from its statistics file) is moved to θ_i's device first."""
    num = torch.zeros_like(ts[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for t, f, w in zip(ts, fs, ws, strict=True):
        f = f.to(t.device).float().clamp_min(eps) * w
        num += f * t.float()
        den += f
    return num / den


def _regmean_solve(wt: list[Tensor], grams: list[Tensor], ws: list[float], alpha, ridge) -> Tensor:
    """(Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ for Wᵀ (..., in, out) and G (..., in, in), batched over leading dims.

    Solved in float64 by least squares as the average plus a minimum-norm correction, so input
    directions that no model's data reaches (a singular Σ G̃_i) keep the average weights.
    """
    grams = [g.double() for g in grams]
    shrunk = [w * (alpha * g + (1 - alpha) * torch.diag_embed(g.diagonal(dim1=-2, dim2=-1)))
              for g, w in zip(grams, ws, strict=True)]  # fmt: skip
    lhs = sum(shrunk[1:], shrunk[0]) + ridge * torch.eye(grams[0].shape[-1], dtype=torch.float64)
    mean = K.linear(wt, ws).double()
    rhs = sum((g @ (w - mean) for g, w in zip(shrunk, wt, strict=True)), torch.zeros_like(mean))
    return mean + torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution


def regmean(
    ts: list[Tensor], grams: list[Tensor], ws: list[float], alpha: float, in_out: bool, ridge=0.0
) -> Tensor:
    """Closed-form RegMean of one linear weight (out, in), or (in, out) when `in_out`."""
    wt = [t.double() if in_out else t.double().T for t in ts]  # each Wᵀ: (in, out)
    out = _regmean_solve(wt, grams, ws, alpha, ridge)
    return (out if in_out else out.T).float()


def regmean_conv(
    ts: list[Tensor], grams: list[Tensor], ws: list[float], alpha: float, ridge=0.0
) -> Tensor:
    """RegMean of one conv weight (out, in/g, kh, kw) from patch Grams (g, d, d), group by group."""
    shape, g = ts[0].shape, grams[0].shape[0]
    if shape[0] % g or grams[0].shape[-1] != shape[1] * shape[2] * shape[3]:
        raise MergeError(
            f"a Gram of shape {tuple(grams[0].shape)} does not fit a conv {tuple(shape)}"
        )
    wt = [t.double().reshape(g, shape[0] // g, -1).transpose(1, 2) for t in ts]  # (g, d, out/g)
    out = _regmean_solve(wt, grams, ws, alpha, ridge)
    return out.transpose(1, 2).reshape(shape).float()


def _fisher_example(base: nn.Module, models: list[nn.Module], seed: int) -> dict[str, Any]:
    return {"per_model": [fisher_stats(m, [batch(seed + k)], seed=seed)[0]
                          for k, m in enumerate(models)]}  # fmt: skip


def _gram_example(base: nn.Module, models: list[nn.Module], seed: int) -> dict[str, Any]:
    return {"per_model": [gram(m, [batch(seed + k)])[0] for k, m in enumerate(models)]}


@register(
    "reuse", "fisher", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=FisherConfig, paper="Matena & Raffel 2021, arXiv 2111.09832",
    example=merge_example(n=2, base=False, stats=_fisher_example),
    cli="lfm reuse stats fisher TEXTS --model MODEL, then lfm reuse merge PLAN.yaml (method: fisher)",
    needs_base=False, prepare=_opener("fisher"),
    divides_by_weight_sum=lambda cfg: True,
)  # fmt: skip
def fisher(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Fisher-weighted average; tensors without a Fisher (buffers) get the weighted average."""
    stats = _per_model(ctx)
    fs = [stats[i].get(ctx.name) for i in ctx.models]
    if any(f is None for f in fs):
        return K.linear(tensors, weights)
    return fisher_merge(tensors, fs, weights, cfg.eps)  # type: ignore[arg-type]


@register(
    "reuse", "regmean", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=RegMeanConfig, paper="Jin et al. 2022, arXiv 2212.09849",
    example=merge_example(n=2, base=False, stats=_gram_example),
    cli="lfm reuse stats gram TEXTS --model MODEL, then lfm reuse merge PLAN.yaml (method: regmean)",
    needs_base=False, prepare=_opener("gram"),
    divides_by_weight_sum=lambda cfg: True,
)  # fmt: skip
def regmean_kernel(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """RegMean for linear and conv weights with Gram matrices; weighted average for the rest."""
    stats = _per_model(ctx)
    grams = [stats[i].get(ctx.name) for i in ctx.models]
    if any(g is None for g in grams) or tensors[0].dim() not in (2, 4):
        return K.linear(tensors, weights)
    if tensors[0].dim() == 4:
        return regmean_conv(tensors, grams, weights, cfg.alpha, cfg.ridge)  # type: ignore[arg-type]
    given = ctx.stats.get("orientation") or stats[ctx.models[0]].meta.get("orientation", {})
    orient = given.get(ctx.name, "out_in")  # in memory: stats={"orientation": {...}, ...}
    return regmean(tensors, grams, weights, cfg.alpha, orient == "in_out", cfg.ridge)  # type: ignore[arg-type]
