"""Merge methods: a config with paper defaults and a registered per-tensor kernel for each.

TIES (arXiv 2306.01708), DARE (arXiv 2311.03099) and task arithmetic (arXiv 2212.04089) are
entries over one implementation, `kernels.task_merge`: θ = θ_b + λ · combine(sparsify(τ_i)), where
sparsify is nothing, magnitude trimming (TIES) or random drop-and-rescale (DARE), and combine is
a weighted sum or TIES's sign election with a disjoint mean. Linear soups (arXiv 2203.05482),
SLERP and Model Stock (arXiv 2403.19522) have kernels of their own. The maths is in `kernels.py`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from lfm.config import Config
from lfm.reuse import kernels as K
from lfm.reuse.driver import Ctx, Inputs, merge_method, merge_state_dicts
from lfm.reuse.topk import model_threshold


class LinearConfig(Config):
    normalize: bool = True  # divide by the sum of the weights (an average, a uniform soup)


class TaskArithmeticConfig(Config):
    scale: float = 1.0  # λ in θ_b + λ Σ w_i τ_i (the paper tunes it on held-out data)


class TiesConfig(Config):
    density: float = Field(0.2, ge=0, le=1)  # fraction of each task vector kept (paper: top 20%)
    scale: float = 1.0  # λ applied to the merged task vector (paper: 1 without validation data)
    trim_scope: Literal["tensor", "model"] = "tensor"  # top-k per tensor, or over the whole model
    normalize: bool = True  # disjoint mean over agreeing entries (False: their sum)


class DareLinearConfig(Config):
    drop_rate: float = Field(0.9, ge=0, lt=1)  # p: probability of dropping each delta entry
    scale: float = 1.0  # λ applied to the summed rescaled task vectors
    seed: int = 0  # drop masks are seeded from (seed, tensor name, model index)


class DareTiesConfig(Config):
    drop_rate: float = Field(0.9, ge=0, lt=1)  # p: probability of dropping each delta entry
    scale: float = 1.0  # λ applied to the merged task vector
    seed: int = 0  # drop masks are seeded from (seed, tensor name, model index)
    normalize: bool = True  # disjoint mean over agreeing entries (False: their sum)


class SlerpConfig(Config):
    t: float = 0.5  # interpolation factor: 0 gives the first model, 1 the second
    eps: float = Field(5e-4, gt=0)  # linear fallback when 1 - |cos Ω| < eps (near-parallel)


class ModelStockConfig(Config):
    eps: float = Field(1e-8, gt=0)  # floor on task-vector norms when computing cosines


# --------------------------------------------------------------------------------------------
# Smoke runs: the whole driver on tiny random state dicts.


def _tiny_sds(seed: int, n: int) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, 6, generator=gen), "b": torch.randn(5, generator=gen)}
    models = [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


def _smoke(method: str, n: int = 3, base: bool = True) -> Any:
    def run(cfg: Config, seed: int) -> dict[str, Tensor]:
        b, sds = _tiny_sds(seed, n)
        return merge_state_dicts(method, b if base else None, sds, cfg)

    return run


# --------------------------------------------------------------------------------------------
# Kernels as the driver calls them: (base, tensors, weights, cfg, ctx) -> merged tensor.


@merge_method(
    "linear", config=LinearConfig, paper="Wortsman et al. 2022, arXiv 2203.05482",
    smoke=_smoke("linear", base=False), needs_base=False,
)  # fmt: skip
def linear(base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx) -> Tensor:
    """Weighted average of the models (the base model, if given, is not used)."""
    return K.linear(ts, ws, cfg.normalize)


@merge_method(
    "task_arithmetic", config=TaskArithmeticConfig, paper="Ilharco et al. 2022, arXiv 2212.04089",
    smoke=_smoke("task_arithmetic"),
)  # fmt: skip
def task_arithmetic(
    base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """θ_b + λ Σ w_i τ_i."""
    assert base is not None
    return K.task_merge(base, K.task_vectors(base, ts), ws, scale=cfg.scale)


def _ties_prepare(inputs: Inputs, cfg: Any) -> dict[str, Any]:
    """Per-model magnitude thresholds over the whole model when `trim_scope == "model"`."""
    if cfg.trim_scope != "model":
        return {}
    assert inputs.base is not None
    base = inputs.base

    def mags(i: int):
        def passes():
            for name in inputs.names:
                key = inputs.sources[name][i]
                b = base.get(name)
                if key is not None and b.is_floating_point():
                    yield (inputs.models[i].get(key).float() - b.float()).abs()

        return passes

    return {
        "thresholds": [model_threshold(mags(i), cfg.density) for i in range(len(inputs.models))]
    }


def _ties_thresholds(taus: list[Tensor], cfg: Any, ctx: Ctx) -> list[float]:
    if "thresholds" in ctx.stats:
        return [ctx.stats["thresholds"][i] for i in ctx.models]
    return [K.magnitude_threshold(t, cfg.density) for t in taus]


@merge_method(
    "ties", config=TiesConfig, paper="Yadav et al. 2023, arXiv 2306.01708",
    smoke=_smoke("ties"), prepare=_ties_prepare,
)  # fmt: skip
def ties(base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx) -> Tensor:
    """Trim to the top-`density` magnitudes, elect signs, disjoint mean, scale by λ."""
    assert base is not None
    taus = K.task_vectors(base, ts)
    for tau, th in zip(taus, _ties_thresholds(taus, cfg, ctx), strict=True):
        K.trim(tau, th, inplace=True)
    return K.task_merge(base, taus, ws, scale=cfg.scale, consensus=True, normalize=cfg.normalize)


def _dare_taus(base: Tensor, ts: list[Tensor], cfg: Any, ctx: Ctx) -> list[Tensor]:
    taus = K.task_vectors(base, ts)
    seeds = [K.tensor_seed(cfg.seed, ctx.name, i) for i in (ctx.models or range(len(ts)))]
    scratch = torch.empty(base.shape) if cfg.drop_rate > 0 else None  # one mask buffer for all
    return [K.dare(t, cfg.drop_rate, s, inplace=True, scratch=scratch)
            for t, s in zip(taus, seeds, strict=True)]  # fmt: skip


@merge_method(
    "dare_linear", config=DareLinearConfig, paper="Yu et al. 2023, arXiv 2311.03099",
    smoke=_smoke("dare_linear"),
)  # fmt: skip
def dare_linear(
    base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Drop-and-rescale each task vector, then task arithmetic."""
    assert base is not None
    return K.task_merge(base, _dare_taus(base, ts, cfg, ctx), ws, scale=cfg.scale)


@merge_method(
    "dare_ties", config=DareTiesConfig, paper="Yu et al. 2023, arXiv 2311.03099",
    smoke=_smoke("dare_ties"),
)  # fmt: skip
def dare_ties(base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx) -> Tensor:
    """Drop-and-rescale each task vector, then TIES sign election and disjoint mean."""
    assert base is not None
    taus = _dare_taus(base, ts, cfg, ctx)
    return K.task_merge(base, taus, ws, scale=cfg.scale, consensus=True, normalize=cfg.normalize)


@merge_method(
    "slerp", config=SlerpConfig, paper="Shoemake 1985, SIGGRAPH (doi 10.1145/325165.325242)",
    smoke=_smoke("slerp", n=2, base=False), needs_base=False, min_models=2, max_models=2,
)  # fmt: skip
def slerp(base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx) -> Tensor:
    """Spherical interpolation between exactly two models (weights are not used)."""
    if len(ts) != 2:  # only with on_missing="skip": a tensor one model lacks is copied
        return ts[0]
    return K.slerp(ts[0], ts[1], cfg.t, cfg.eps)


@merge_method(
    "model_stock", config=ModelStockConfig, paper="Jang et al. 2024, arXiv 2403.19522",
    smoke=_smoke("model_stock"), min_models=2,
)  # fmt: skip
def model_stock(
    base: Tensor | None, ts: list[Tensor], ws: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Interpolate the models' average towards the base by the angle of their task vectors."""
    assert base is not None
    if len(ts) < 2:  # only with on_missing="skip": one fine-tuned model has no angle
        return ts[0].float()
    return K.model_stock(base, ts, cfg.eps)
