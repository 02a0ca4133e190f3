"""Feature distillation losses: activations at named modules in, loss out (HIDDEN access).

- FitNets (Romero et al. 2014, arXiv 1412.6550): a learned regressor `r` maps the student's guided
  layer to the teacher's hint layer, `L = ‖u_h(x) − r(v_g(x))‖²` (a mean over elements here, so
  that the weight does not grow with the feature size). `HintProjector` is `r`; `fitnets` is
  registered with it as its `projector`, so the distiller builds and trains one per term.
- Attention transfer (Zagoruyko & Komodakis 2016, arXiv 1612.03928): `Q = Σ_c |A_c|^p` flattened,
  `L = β/2 · mean ‖Q_s/‖Q_s‖₂ − Q_t/‖Q_t‖₂‖²` with p = 2 and β = 10³ (the paper divides β by the
  map size and batch size, i.e. takes a mean).
- RKD (Park et al. 2019, arXiv 1904.05068): distance `ψ_D(t_i,t_j) = ‖t_i − t_j‖ / μ` with μ the
  mean pairwise distance, angle `ψ_A(t_i,t_j,t_k) = ⟨e_ij, e_kj⟩`, `e_ij = (t_i − t_j)/‖t_i − t_j‖`;
  both matched with the Huber loss, weights λ_D = 25, λ_A = 50.
- PKT (Passalis & Tefas 2018, arXiv 1803.10837): cosine kernel `K = (cos + 1)/2`, conditional
  probabilities `p_{j|i} = K_ij / Σ_{k≠i} K_ik`, `L = mean_i Σ_{j≠i} p^t_{j|i} log(p^t_{j|i}/p^s_{j|i})`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lfm.access import Access
from lfm.config import Config
from lfm.distill.contract import LOSS
from lfm.distill.losses import CLI, loss_example
from lfm.registry import register

BRANCH = "with data"


class FitNetsConfig(Config):
    pass  # the hint loss has no knob; the regressor's shape follows the two feature shapes


class ATConfig(Config):
    p: float = Field(2.0, gt=0)  # exponent of the attention map Σ_c |A_c|^p (paper: 2)
    beta: float = Field(1000.0, ge=0)  # weight β of the attention term (paper: 10³)


class RKDConfig(Config):
    distance_weight: float = Field(25.0, ge=0)  # λ_D, weight of the distance term (paper: 25)
    angle_weight: float = Field(50.0, ge=0)  # λ_A, weight of the angle term (paper: 50)


class PKTConfig(Config):
    eps: float = Field(1e-7, gt=0)  # keeps the logarithms finite for near-zero probabilities


class HintProjector(nn.Module):
    """FitNets regressor `r`: a 1×1 convolution for maps (B, C, H, W), else a linear layer.

    Spatial sizes that differ are matched by adaptive average pooling to the teacher's size.
    """

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        super().__init__()
        conv = len(teacher_shape) == 4
        self.spatial = tuple(teacher_shape[2:]) if conv else None
        dim = 1 if conv else -1
        c_in, c_out = student_shape[dim], teacher_shape[dim]
        self.proj = nn.Conv2d(c_in, c_out, 1) if conv else nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial and tuple(x.shape[2:]) != self.spatial:
            x = F.adaptive_avg_pool2d(x, self.spatial)
        return self.proj(x)


# Feature losses compare the second convolution's maps of a tiny teacher and student CNN.
_EXAMPLE = loss_example("conv2", "conv2")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()  # (B, D)


def fitnets_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: FitNetsConfig = FitNetsConfig()
) -> torch.Tensor:
    """Hint loss: mean squared error between projected student and teacher features.

    Args:
        student: `HintProjector(student_features)`, the same shape as `teacher`.
        teacher: the hint layer's output.
        cfg: no knobs.
    """
    return F.mse_loss(student.float(), teacher.detach().float())


fitnets_loss = register(
    "distill", "fitnets", shape=LOSS, branch=BRANCH, access=Access.HIDDEN, config=FitNetsConfig,
    paper="Romero et al. 2014, arXiv 1412.6550",
    example=_EXAMPLE, cli=CLI.format("fitnets"), projector=HintProjector,
)(fitnets_loss)  # fmt: skip


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """`Q = Σ_c |A_c|^p` of (B, C, H, W) features, flattened and L2-normalised: (B, H·W)."""
    return F.normalize(a.float().abs().pow(p).sum(1).flatten(1), dim=1)


def at_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: ATConfig = ATConfig()
) -> torch.Tensor:
    """Attention transfer between (B, C, H, W) maps; channel counts may differ.

    When the spatial sizes differ, a map is average-pooled to the smaller height and the smaller
    width of the two (each dimension on its own: a 2×8 and a 4×4 map both become 2×4).
    """
    size = tuple(map(min, student.shape[-2:], teacher.shape[-2:]))
    s = F.adaptive_avg_pool2d(student, size) if tuple(student.shape[-2:]) != size else student
    t = F.adaptive_avg_pool2d(teacher, size) if tuple(teacher.shape[-2:]) != size else teacher
    diff = attention_map(s, cfg.p) - attention_map(t.detach(), cfg.p)
    return cfg.beta / 2 * diff.pow(2).mean()


at_loss = register(
    "distill", "at", shape=LOSS, branch=BRANCH, access=Access.HIDDEN, config=ATConfig,
    paper="Zagoruyko & Komodakis 2016, arXiv 1612.03928",
    example=_EXAMPLE, cli=CLI.format("at"),
)(at_loss)  # fmt: skip


def _pair_distances(e: torch.Tensor) -> torch.Tensor:
    """ψ_D: pairwise distances (B, B) divided by their mean over pairs i ≠ j."""
    d = torch.cdist(e, e)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(1e-12)


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber loss between normalised pairwise distances, a mean over pairs i ≠ j."""
    s, t = _pair_distances(_flat(student)), _pair_distances(_flat(teacher).detach())
    off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return F.smooth_l1_loss(s[off], t[off])


def _angles(e: torch.Tensor) -> torch.Tensor:
    """ψ_A: cos ∠(e_i, e_j, e_k) = ⟨e_ij, e_kj⟩ for all triplets, (B, B, B) indexed [j, i, k]."""
    unit = F.normalize(e.unsqueeze(1) - e.unsqueeze(0), dim=-1)  # [j, i] = (e_i − e_j)/‖·‖
    return unit @ unit.transpose(1, 2)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber loss between the cosines of all triplet angles."""
    return F.smooth_l1_loss(_angles(_flat(student)), _angles(_flat(teacher).detach()))


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: RKDConfig = RKDConfig()
) -> torch.Tensor:
    """`λ_D · RKD-D + λ_A · RKD-A` on embeddings (B, ...); dimensions may differ."""
    out = student.new_zeros((), dtype=torch.float32)
    if cfg.distance_weight:
        out = out + cfg.distance_weight * rkd_distance(student, teacher)
    if cfg.angle_weight:
        out = out + cfg.angle_weight * rkd_angle(student, teacher)
    return out


rkd_loss = register(
    "distill", "rkd", shape=LOSS, branch=BRANCH, access=Access.HIDDEN, config=RKDConfig,
    paper="Park et al. 2019, arXiv 1904.05068",
    example=_EXAMPLE, cli=CLI.format("rkd"),
)(rkd_loss)  # fmt: skip


def _pkt_probs(e: torch.Tensor, eps: float) -> torch.Tensor:
    """p_{j|i} from the cosine kernel (cos + 1)/2, diagonal excluded: (B, B)."""
    u = F.normalize(e, dim=1)
    k = (u @ u.T + 1) / 2
    k = k * (1 - torch.eye(len(e), device=e.device))
    return k / k.sum(1, keepdim=True).clamp_min(eps)


def pkt_loss(
    student: torch.Tensor, teacher: torch.Tensor, cfg: PKTConfig = PKTConfig()
) -> torch.Tensor:
    """PKT: KL between the teacher's and the student's kernel probabilities, mean over rows."""
    p_s, p_t = _pkt_probs(_flat(student), cfg.eps), _pkt_probs(_flat(teacher).detach(), cfg.eps)
    off = 1 - torch.eye(len(p_t), device=p_t.device)
    kl = p_t * (torch.log(p_t + cfg.eps) - torch.log(p_s + cfg.eps)) * off
    return kl.sum(1).mean()


pkt_loss = register(
    "distill", "pkt", shape=LOSS, branch=BRANCH, access=Access.HIDDEN, config=PKTConfig,
    paper="Passalis & Tefas 2018, arXiv 1803.10837",
    example=_EXAMPLE, cli=CLI.format("pkt"),
)(pkt_loss)  # fmt: skip
