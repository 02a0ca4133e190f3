"""Logit distillation losses: logits in, loss out (SCORES access is enough).

- KD (Hinton et al. 2015, arXiv 1503.02531): `T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`; the T²
  factor keeps gradient magnitudes comparable across temperatures.
- Reverse KL: `T² · KL(softmax(z_s/T) ‖ softmax(z_t/T))`, mode-seeking instead of mean-seeking.
- Top-k KD: the teacher gives only its top-k log-probabilities (as hosted APIs do); both
  distributions are renormalised over the top-k set `S`: `q_i ∝ exp(l_i/T)`, `p_i ∝ exp(z_i/T)`,
  `i ∈ S`. With `residual=True` one extra bucket holds the mass outside `S`. With k = V it is KD.
- DIST (Huang et al. 2022, arXiv 2205.10536): with `Y = softmax(z/τ)` (B, C),
  `τ² (β · mean_i d_p(Y_s[i,:], Y_t[i,:]) + γ · mean_j d_p(Y_s[:,j], Y_t[:,j]))`,
  `d_p = 1 − Pearson correlation`: inter-class (rows) and intra-class (columns) relations.

Teacher "logits" may be log-probabilities: every loss here is invariant to a per-row shift.
Inputs of shape (..., V) are flattened to (N, V); the batch reduction is a mean over N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from lfm.access import Access, LocalClassifier, narrow
from lfm.config import Config
from lfm.core.tiny import tiny_cnn
from lfm.core.train import TrainConfig
from lfm.distill.contract import LOSS
from lfm.registry import Example, register

BRANCH = "with data"
# Every loss runs by name on Fashion-MNIST: `lfm distill vision --method <name>`.
CLI = "lfm distill vision --method {}"


class KDConfig(Config):
    temperature: float = Field(4.0, gt=0)  # softening temperature T; Hinton et al. tried 1–20


class ReverseKLConfig(Config):
    temperature: float = Field(1.0, gt=0)  # softening temperature T, applied to both sides


class TopKConfig(Config):
    k: int = Field(20, ge=1)  # how many teacher log-probabilities the API returns (per row)
    temperature: float = Field(1.0, gt=0)  # softening temperature T over the top-k set
    residual: bool = False  # add a bucket for the mass outside the top-k (see `topk_kd_loss`)


class DISTConfig(Config):
    tau: float = Field(1.0, gt=0)  # temperature τ of the softmax (paper: 1 on CIFAR/ImageNet)
    beta: float = Field(1.0, ge=0)  # weight β of the inter-class (per-example) relation
    gamma: float = Field(1.0, ge=0)  # weight γ of the intra-class (per-class) relation


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()  # (N, V)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p ‖ q) from log-probabilities (N, V)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def loss_example(student_module: str = "", teacher_module: str = "", cfg: Config | None = None):
    """A registry example for a loss: three distillation steps from a tiny BatchNorm CNN teacher
    (its handle at the level asked for) into a narrower one, on 1×8×8 images with labels."""

    def example(level: Access, seed: int) -> Example:
        teacher = narrow(LocalClassifier(tiny_cnn(seed), "teacher"), level)
        student = tiny_cnn(seed + 1, warm=False, width=4)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        kw = {
            "train_cfg": TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False),
            "label_weight": 0.5, "student_module": student_module, "teacher_module": teacher_module,
        }  # fmt: skip
        return Example(
            (teacher, student, [(x[:8], y[:8]), (x[8:], y[8:])]),
            kw,
            cfg,
            summary=lambda r: torch.tensor(r.history.losses),
        )

    return example


# pragma: no mutate end


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: KDConfig = KDConfig()
) -> torch.Tensor:
    """Soft-target KD: `T² · KL(p_t^T ‖ p_s^T)`.

    Args:
        student: student logits (..., V).
        teacher: teacher logits or log-probabilities (..., V).
        cfg: the temperature.
    """
    t = cfg.temperature
    log_s = F.log_softmax(_rows(student) / t, -1)
    log_t = F.log_softmax(_rows(teacher).detach() / t, -1)
    return t * t * _kl(log_t, log_s)


kd_loss = register(
    "distill", "kd", shape=LOSS, branch=BRANCH, access=Access.SCORES, config=KDConfig,
    paper="Hinton et al. 2015, arXiv 1503.02531",
    example=loss_example(), cli=CLI.format("kd"),
)(kd_loss)  # fmt: skip


def reverse_kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: ReverseKLConfig = ReverseKLConfig()
) -> torch.Tensor:
    """Reverse KL `T² · KL(p_s^T ‖ p_t^T)`: the student puts its mass on the teacher's modes."""
    t = cfg.temperature
    log_s = F.log_softmax(_rows(student) / t, -1)
    log_t = F.log_softmax(_rows(teacher).detach() / t, -1)
    return t * t * _kl(log_s, log_t)


reverse_kl_loss = register(
    "distill", "reverse_kl", shape=LOSS, branch=BRANCH, access=Access.SCORES, config=ReverseKLConfig,
    paper="Gu et al. 2023 (MiniLLM), arXiv 2306.08543",
    example=loss_example(), cli=CLI.format("reverse_kl"),
)(reverse_kl_loss)  # fmt: skip


def _residual_log(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(log_probs)) per row, clamped so that an empty residual stays finite."""
    mass = log_probs.exp().sum(-1, keepdim=True)
    return torch.log1p(-mass.clamp(max=1 - 1e-6))


def _topk_teacher(
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, indices) (N, k) at T=1: given as a pair, or taken from full logits."""
    if isinstance(teacher, tuple):
        values, index = teacher
        return _rows(values).detach(), index.reshape(-1, index.shape[-1])
    log_t = F.log_softmax(_rows(teacher).detach(), -1)
    return log_t.topk(min(k, log_t.shape[-1]), dim=-1)


def topk_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    cfg: TopKConfig = TopKConfig(),
) -> torch.Tensor:
    """KD from the teacher's top-k log-probabilities only.

    Without residual, both sides are renormalised over the top-k set `S`. With `residual=True`
    a (k+1)-th bucket holds the mass outside `S`: the student's is exact (`1 − Σ_S p_s` at
    temperature T); the teacher's is `1 − Σ_S p_t` at T=1, tempered as if it were one token
    (its split over the vocabulary is unknown), so the bucket is exact only at T=1.

    Args:
        student: student logits (..., V).
        teacher: full teacher logits (..., V), or a pair (log-probs, indices) of shape (..., k)
            as an API returns them (log-probabilities at temperature 1).
        cfg: k, temperature and the residual option.
    """
    t = cfg.temperature
    log_t, index = _topk_teacher(teacher, cfg.k)
    z = _rows(student)
    if not cfg.residual:
        log_s = F.log_softmax(z.gather(-1, index) / t, -1)
        return t * t * _kl(F.log_softmax(log_t / t, -1), log_s)
    full_s = F.log_softmax(z / t, -1)
    log_s = full_s.gather(-1, index)
    log_s = torch.cat([log_s, _residual_log(log_s)], -1)
    log_t = F.log_softmax(torch.cat([log_t, _residual_log(log_t)], -1) / t, -1)
    return t * t * _kl(log_t, log_s)


topk_kd_loss = register(
    "distill", "topk_kd", shape=LOSS, branch=BRANCH, access=Access.SCORES, config=TopKConfig,
    paper="Hinton et al. 2015, arXiv 1503.02531 (top-k API log-probabilities)",
    example=loss_example(cfg=TopKConfig(k=3)), cli=CLI.format("topk_kd"),
)(topk_kd_loss)  # fmt: skip


def pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`1 − Pearson correlation` of `a` and `b` along the last dimension."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: DISTConfig = DISTConfig()
) -> torch.Tensor:
    """DIST: inter-class (per example) plus intra-class (per class) Pearson relations."""
    y_s = F.softmax(_rows(student) / cfg.tau, -1)  # (N, C)
    y_t = F.softmax(_rows(teacher).detach() / cfg.tau, -1)
    inter = pearson_distance(y_s, y_t).mean()
    intra = pearson_distance(y_s.T, y_t.T).mean()
    return cfg.tau**2 * (cfg.beta * inter + cfg.gamma * intra)


dist_loss = register(
    "distill", "dist", shape=LOSS, branch=BRANCH, access=Access.SCORES, config=DISTConfig,
    paper="Huang et al. 2022, arXiv 2205.10536",
    example=loss_example(), cli=CLI.format("dist"),
)(dist_loss)  # fmt: skip
