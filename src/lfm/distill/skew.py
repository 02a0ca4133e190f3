"""Skew KL divergence (DistiLLM, Ko et al. 2024, arXiv 2402.03898, Eq. 3).

KD's forward KL, KL(p ‖ q_θ), has unbounded gradients where the student q_θ puts almost no mass on
a token the teacher p likes. DistiLLM mixes a little of the teacher into the student's side:

    SKL^(α)(p, q_θ) = KL(p ‖ α p + (1 − α) q_θ)

which is bounded by log(1/α) and equals forward KL at α = 0. The paper uses α = 0.1. The mixture
is formed in probability space; logits or log-probabilities of either side are accepted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from lfm.access import Access
from lfm.config import Config
from lfm.distill.contract import LOSS
from lfm.distill.losses import BRANCH, CLI, loss_example
from lfm.registry import register


class SkewKLConfig(Config):
    alpha: float = Field(0.1, ge=0, lt=1)  # α: the teacher's share of the mixture (paper: 0.1)
    temperature: float = Field(1.0, gt=0)  # softening temperature T on both sides


def skew_kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: SkewKLConfig = SkewKLConfig()
) -> torch.Tensor:
    """`T² · KL(p ‖ α p + (1 − α) q)`, mean over rows of (..., V) outputs."""
    t = cfg.temperature
    log_s = F.log_softmax(student.reshape(-1, student.shape[-1]).float() / t, -1)
    log_p = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float().detach() / t, -1)
    if cfg.alpha > 0:  # log(α p + (1 − α) q) without leaving log space
        log_m = torch.logaddexp(log_p + math.log(cfg.alpha), log_s + math.log1p(-cfg.alpha))
    else:
        log_m = log_s
    return t * t * (log_p.exp() * (log_p - log_m)).sum(-1).mean()


skew_kl_loss = register(
    "distill", "skew_kl", shape=LOSS, branch=BRANCH, access=Access.SCORES, config=SkewKLConfig,
    paper="Ko et al. 2024 (DistiLLM), arXiv 2402.03898",
    example=loss_example(), cli=CLI.format("skew_kl"),
)(skew_kl_loss)  # fmt: skip
