"""Model-inversion pieces shared by the data-free meta-learners (`lfm.meta.datafree`).

Priors that keep inverted inputs plausible: total variation, and the BatchNorm-statistics prior
of DeepInversion (Yin et al. 2020, arXiv 1912.08795, Eq. 4),

    R_bn(x) = Σ_l ‖μ_l(x) − E[μ_l]‖₂ + ‖σ²_l(x) − E[σ²_l]‖₂,

which matches the statistics of x at each BatchNorm layer l to the running statistics the model
kept while training; and a SCORES view that counts the inputs a black-box method sends.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lfm.access import Access


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels of (B, C, H, W) images; 0 for vectors."""
    if x.dim() != 4:
        return x.new_zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()


def bn_prior(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of `x` and Σ_l ‖μ_l(x) − μ_l‖ + ‖σ²_l(x) − σ²_l‖ over BatchNorm layers."""
    terms: list[Tensor] = []

    def hook(mod: _BatchNorm, inp: tuple[Tensor, ...], _out: Tensor) -> None:
        a = inp[0]
        dims = [0, 2, 3] if a.dim() == 4 else [0]
        mean, var = a.mean(dims), a.var(dims, unbiased=False)
        terms.append((mean - mod.running_mean).norm() + (var - mod.running_var).norm())

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    hooks = [m.register_forward_hook(hook) for m in bns]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, sum(terms, x.new_zeros(()))


class CountedScores:
    """A SCORES view of a handle that counts the inputs sent to it (the query budget)."""

    access = Access.SCORES

    def __init__(self, handle: Any):
        self._handle, self.queries = handle, 0

    def scores(self, x: Tensor) -> Tensor:
        self.queries += x.shape[0]
        return self._handle.scores(x)
