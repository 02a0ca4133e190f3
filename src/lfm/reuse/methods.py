"""Merge methods: a config with paper defaults and a registered per-tensor kernel for each.

TIES (arXiv 2306.01708), DARE (arXiv 2311.03099), Model Breadcrumbs (arXiv 2312.06795), DELLA
(arXiv 2406.11617) and task arithmetic (arXiv 2212.04089) are entries over one implementation,
`kernels.task_merge`: θ = θ_b + λ · combine(sparsify(τ_i)), where sparsify is nothing, magnitude
trimming (TIES), random drop-and-rescale (DARE), the middle band of magnitudes (Breadcrumbs) or
drop-and-rescale with probabilities by magnitude rank (DELLA's MagPrune), and combine is a weighted
sum or TIES's sign election with a disjoint mean. Linear soups (arXiv 2203.05482), SLERP and Model
Stock (arXiv 2403.19522) have kernels of their own. The maths is in `kernels.py`; the merges in
the singular-vector basis of each matrix (TSV-Merge, Iso-C, Iso-CTS) are in `spectral.py`.

Each kernel is registered with the `KERNEL` shape and runs by name over whole models:
`lfm.registry.run("reuse/ties", [model_a, model_b], base=base, cfg={"density": 0.2})`.
"""

from __future__ import annotations

from typing import Any, Literal, Self

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from lfm.access import Access
from lfm.config import Config
from lfm.registry import register
from lfm.reuse import kernels as K
from lfm.reuse.contract import KERNEL
from lfm.reuse.driver import Ctx, Inputs
from lfm.reuse.examples import merge_example
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


class _BandFields(Config):
    drop_top: float = Field(0.01, ge=0, lt=1)  # β: share of largest magnitudes masked (paper: 1 %)
    drop_bottom: float = Field(0.9, ge=0, lt=1)  # γ: share of smallest magnitudes masked (90 %)

    @model_validator(mode="after")
    def _band(self) -> Self:
        if self.drop_top + self.drop_bottom >= 1:
            raise ValueError("drop_top + drop_bottom must be below 1: together they are masked")
        return self


class BreadcrumbsConfig(_BandFields):
    scale: float = 1.0  # λ in θ_b + λ Σ w_i τ̃_i (the paper tunes it on held-out data)


class BreadcrumbsTiesConfig(_BandFields):
    scale: float = 1.0  # λ applied to the merged task vector
    normalize: bool = True  # disjoint mean over agreeing entries (False: their sum)


class _DellaFields(Config):
    drop_rate: float = Field(0.3, ge=0, lt=1)  # p: mean drop probability (authors' setting: 0.3)
    window: float = Field(0.14, ge=0, lt=1)  # ε: drop probabilities span p ± ε/2 by rank (0.14)
    seed: int = 0  # drop masks are seeded from (seed, tensor name, model index)

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.drop_rate - self.window / 2 < 0 or self.drop_rate + self.window / 2 >= 1:
            raise ValueError("drop_rate ± window/2 must lie in [0, 1): they are drop probabilities")
        return self


class DellaConfig(_DellaFields):
    scale: float = 1.1  # λ applied to the merged task vector (the authors' setting: 1.1)
    normalize: bool = True  # disjoint mean over agreeing entries (False: their sum)


class DellaLinearConfig(_DellaFields):
    scale: float = 1.0  # λ applied to the summed rescaled task vectors


class SlerpConfig(Config):
    t: float = Field(0.5, ge=0, le=1)  # interpolation factor: 0 gives the first model, 1 the second
    eps: float = Field(5e-4, gt=0)  # linear fallback when 1 - |cos Ω| < eps (near-parallel)


class ModelStockConfig(Config):
    eps: float = Field(1e-8, gt=0)  # floor on task-vector norms when computing cosines


# --------------------------------------------------------------------------------------------
# Kernels as the driver calls them: (base, tensors, weights, cfg, ctx) -> merged tensor. Each is
# registered with `shape=KERNEL`; what the driver needs besides the kernel (`needs_base`,
# `min_models`, `max_models`, `prepare`) goes into the entry's extras.

PLAN = "lfm reuse merge PLAN.yaml (method: {})"


def linear(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Weighted average of the models (the base model, if given, is not used)."""
    return K.linear(tensors, weights, cfg.normalize)


linear = register(
    "reuse", "linear", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=LinearConfig, paper="Wortsman et al. 2022, arXiv 2203.05482",
    example=merge_example(base=False), cli=PLAN.format("linear"), needs_base=False,
    divides_by_weight_sum=lambda cfg: cfg.normalize,
)(linear)  # fmt: skip


def task_arithmetic(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """θ_b + λ Σ w_i τ_i."""
    assert base is not None
    return K.task_merge(base, K.task_vectors(base, tensors), weights, scale=cfg.scale)


task_arithmetic = register(
    "reuse", "task_arithmetic", shape=KERNEL, branch="weight interpolation",
    access=Access.WEIGHTS, config=TaskArithmeticConfig,
    paper="Ilharco et al. 2022, arXiv 2212.04089", example=merge_example(),
    cli=PLAN.format("task_arithmetic"),
)(task_arithmetic)  # fmt: skip


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


def _ties_merge(
    base: Tensor, taus: list[Tensor], thresholds: list[float], weights: list[float], cfg: Any
) -> Tensor:
    for tau, th in zip(taus, thresholds, strict=True):
        K.trim(tau, th, inplace=True)
    return K.task_merge(
        base, taus, weights, scale=cfg.scale, consensus=True, normalize=cfg.normalize
    )


def ties(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Trim to the top-`density` magnitudes, elect signs, disjoint mean, scale by λ.

    The thresholds need the whole tensor; the rest is elementwise, and a large tensor goes
    through it chunk by chunk (`K.by_chunks`: the same floats, no whole-tensor temporaries).
    """
    assert base is not None
    given = [ctx.stats["thresholds"][i] for i in ctx.models] if "thresholds" in ctx.stats else None
    if K.chunked(base):
        ths = (
            given
            if given is not None
            else [K.difference_threshold(x, base, cfg.density) for x in tensors]
        )
        return K.by_chunks(
            lambda b, xs: _ties_merge(b, K.task_vectors(b, xs), ths, weights, cfg), base, tensors
        )
    taus = K.task_vectors(base, tensors)
    ths = given if given is not None else [K.magnitude_threshold(t, cfg.density) for t in taus]
    return _ties_merge(base, taus, ths, weights, cfg)


ties = register(
    "reuse", "ties", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=TiesConfig, paper="Yadav et al. 2023, arXiv 2306.01708", example=merge_example(),
    cli=PLAN.format("ties"), prepare=_ties_prepare,
)(ties)  # fmt: skip


def _dare_merge(
    base: Tensor, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx, consensus: bool
) -> Tensor:
    """Drop-and-rescale each task vector (its mask seeded per tensor and model), then task
    arithmetic, or with `consensus` TIES's sign election and disjoint mean. A large tensor goes
    chunk by chunk, each model's mask drawn on from one generator: the same floats."""
    seeds = [K.tensor_seed(cfg.seed, ctx.name, i) for i in (ctx.models or range(len(tensors)))]
    big = K.chunked(base)
    rngs: list[int | np.random.Generator] = [*seeds]
    if big:  # one stream per model, drawn on chunk after chunk
        rngs = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
    size = K.CHUNK if big else base.numel()
    scratch = torch.empty(size) if cfg.drop_rate > 0 else None  # one mask buffer for all

    def merge(b: Tensor, xs: list[Tensor]) -> Tensor:
        mask = None if scratch is None else scratch[: b.numel()].view(b.shape)
        taus = [K.dare(t, cfg.drop_rate, r, inplace=True, scratch=mask)
                for t, r in zip(K.task_vectors(b, xs), rngs, strict=True)]  # fmt: skip
        return K.task_merge(
            b, taus, weights, scale=cfg.scale, consensus=consensus,
            normalize=consensus and cfg.normalize,
        )  # fmt: skip

    return K.by_chunks(merge, base, tensors) if big else merge(base, tensors)


def dare_linear(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Drop-and-rescale each task vector, then task arithmetic."""
    assert base is not None
    return _dare_merge(base, tensors, weights, cfg, ctx, consensus=False)


dare_linear = register(
    "reuse", "dare_linear", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=DareLinearConfig, paper="Yu et al. 2023, arXiv 2311.03099", example=merge_example(),
    cli=PLAN.format("dare_linear"),
)(dare_linear)  # fmt: skip


def dare_ties(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Drop-and-rescale each task vector, then TIES sign election and disjoint mean."""
    assert base is not None
    return _dare_merge(base, tensors, weights, cfg, ctx, consensus=True)


dare_ties = register(
    "reuse", "dare_ties", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=DareTiesConfig, paper="Yu et al. 2023, arXiv 2311.03099", example=merge_example(),
    cli=PLAN.format("dare_ties"),
)(dare_ties)  # fmt: skip


def _band_taus(base: Tensor, tensors: list[Tensor], cfg: Any) -> list[Tensor]:
    taus = K.task_vectors(base, tensors)
    return [K.middle_band(t, cfg.drop_top, cfg.drop_bottom) for t in taus]


def breadcrumbs(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Mask each task vector to its middle band of magnitudes, then task arithmetic."""
    assert base is not None
    return K.task_merge(base, _band_taus(base, tensors, cfg), weights, scale=cfg.scale)


breadcrumbs = register(
    "reuse", "breadcrumbs", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=BreadcrumbsConfig, paper="Davari & Belilovsky 2023, arXiv 2312.06795",
    example=merge_example(), cli=PLAN.format("breadcrumbs"),
)(breadcrumbs)  # fmt: skip


def breadcrumbs_ties(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Breadcrumbs' masks, then TIES sign election and disjoint mean."""
    assert base is not None
    taus = _band_taus(base, tensors, cfg)
    return K.task_merge(
        base, taus, weights, scale=cfg.scale, consensus=True, normalize=cfg.normalize
    )


breadcrumbs_ties = register(
    "reuse", "breadcrumbs_ties", shape=KERNEL, branch="weight interpolation",
    access=Access.WEIGHTS, config=BreadcrumbsTiesConfig,
    paper="Davari & Belilovsky 2023, arXiv 2312.06795 (with TIES's sign election, as mergekit)",
    example=merge_example(), cli=PLAN.format("breadcrumbs_ties"),
)(breadcrumbs_ties)  # fmt: skip


def _della_taus(base: Tensor, tensors: list[Tensor], cfg: Any, ctx: Ctx) -> list[Tensor]:
    taus = K.task_vectors(base, tensors)
    seeds = [K.tensor_seed(cfg.seed, ctx.name, i) for i in (ctx.models or range(len(tensors)))]
    return [K.magprune(t, cfg.drop_rate, cfg.window, s) for t, s in zip(taus, seeds, strict=True)]


def della(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """MagPrune each task vector (drop by magnitude rank, rescale), elect signs, disjoint mean, λ."""
    assert base is not None
    taus = _della_taus(base, tensors, cfg, ctx)
    return K.task_merge(
        base, taus, weights, scale=cfg.scale, consensus=True, normalize=cfg.normalize
    )


della = register(
    "reuse", "della", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=DellaConfig, paper="Deep et al. 2024, arXiv 2406.11617", example=merge_example(),
    cli=PLAN.format("della"),
)(della)  # fmt: skip


def della_linear(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """MagPrune each task vector, then task arithmetic."""
    assert base is not None
    return K.task_merge(base, _della_taus(base, tensors, cfg, ctx), weights, scale=cfg.scale)


della_linear = register(
    "reuse", "della_linear", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=DellaLinearConfig, paper="Deep et al. 2024, arXiv 2406.11617 (without sign election)",
    example=merge_example(), cli=PLAN.format("della_linear"),
)(della_linear)  # fmt: skip


def slerp(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Spherical interpolation between exactly two models (weights are not used)."""
    if len(tensors) != 2:  # only with on_missing="skip": a tensor one model lacks is copied
        return tensors[0]
    return K.slerp(tensors[0], tensors[1], cfg.t, cfg.eps)


slerp = register(
    "reuse", "slerp", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=SlerpConfig, paper="Shoemake 1985, SIGGRAPH (doi 10.1145/325165.325242)",
    example=merge_example(n=2, base=False), cli=PLAN.format("slerp"),
    needs_base=False, min_models=2, max_models=2,
)(slerp)  # fmt: skip


def model_stock(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Interpolate the models' average towards the base by the angle of their task vectors."""
    assert base is not None
    if len(tensors) < 2:  # only with on_missing="skip": one fine-tuned model has no angle
        return tensors[0].float()
    return K.model_stock(base, tensors, cfg.eps)


model_stock = register(
    "reuse", "model_stock", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=ModelStockConfig, paper="Jang et al. 2024, arXiv 2403.19522",
    example=merge_example(), cli=PLAN.format("model_stock"), min_models=2,
)(model_stock)  # fmt: skip
