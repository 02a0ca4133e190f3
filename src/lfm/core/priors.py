"""Image priors of model inversion, shared by data-free distillation and data-free meta-learning.

DeepInversion (Yin et al. 2020, arXiv 1912.08795, Eq. 3-4) keeps inverted inputs x̂ plausible with

    R_feature(x̂) = Σ_l ‖μ_l(x̂) − E[μ_l]‖₂ + ‖σ²_l(x̂) − E[σ²_l]‖₂     (BatchNorm statistics)
    R_TV(x̂)     = mean |x̂_{i+1,j} − x̂_{i,j}|^p + mean |x̂_{i,j+1} − x̂_{i,j}|^p

where μ_l, σ²_l are the batch statistics of the input of the l-th BatchNorm layer and E[·] its
running statistics. The paper's total variation is the squared one (p = 2); p = 1 is the absolute
variant its code also offers. Both are this one function; each method says which p it uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lfm.core.hooks import hooked


def total_variation(x: torch.Tensor, p: Literal[1, 2] = 2) -> torch.Tensor:
    """R_TV of images (B, C, H, W): mean |difference|^p of vertical plus horizontal neighbours.

    Inputs that are not images (vectors) have no neighbours: their total variation is 0.
    """
    if x.dim() != 4:
        return x.new_zeros(())
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs()
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs()
    if p == 2:
        return dh.pow(2).mean() + dw.pow(2).mean()
    return dh.mean() + dw.mean()


def _stat_dims(a: torch.Tensor) -> list[int]:
    return [0, *range(2, a.dim())]  # (B, C[, H, W]): per channel over every other axis


@contextmanager
def bn_statistics(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect `‖μ − μ_BN‖₂ + ‖σ² − σ²_BN‖₂` per BatchNorm layer and forward pass.

    Only BatchNorm layers that keep running statistics take part (the others have no target).
    """
    terms: list[torch.Tensor] = []

    def hook(mod: Any, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
        a = inp[0].float()
        dims = _stat_dims(a)
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        terms.append((mean - mod.running_mean).norm() + (var - mod.running_var).norm())

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    with hooked([(m, hook) for m in bns]):
        yield terms


def bn_prior(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output on `x` and R_feature(x), the sum over its BatchNorm layers."""
    with bn_statistics(model) as terms:
        logits = model(x)
    return logits, torch.stack(terms).sum() if terms else x.new_zeros(())
