"""Data-free distillation: noise optimisation and generative reconstruction (WEIGHTS access).

- DeepInversion (Yin et al. 2020, arXiv 1912.08795), branch "noise optimisation": images `x̂`
  (pixels as parameters) minimise
      L(x̂) = CE(f_t(x̂), y) + β_f · Σ_l (‖μ_l(x̂) − μ_l^BN‖₂ + ‖σ²_l(x̂) − σ²_l^BN‖₂)
             + α_tv · R_TV(x̂) + α_l2 · ‖x̂‖²
  where μ_l, σ²_l are the batch statistics of the input of the teacher's l-th BatchNorm layer and
  μ_l^BN, σ²_l^BN its running statistics. A student then learns the teacher on `x̂` with KD.
  Adaptive DeepInversion adds α_c · (1 − JS(p_t(x̂), p_s(x̂))), so that new images are those
  on which the current student still disagrees with the teacher (`deep_inversion_distill`).
- DAFL (Chen et al. 2019, arXiv 1904.01186), branch "generative reconstruction": a generator G
  is trained through the fixed teacher with
      L_G = H_CE(y_T, argmax y_T) − α · mean|f_T| − β · H(mean_i softmax(y_T^i))
  (one-hot, activation and information-entropy losses, α = 0.1, β = 5), and the student learns
  the teacher on G(z) with KD, alternating with the generator.

The teacher is a `LocalClassifier` (its parameters are never updated nor given gradients).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lfm.access import Access, LocalClassifier, capture
from lfm.config import Config
from lfm.core.train import TrainConfig, shuffled_batches
from lfm.distill.distiller import distill
from lfm.distill.game import (
    GameResult,
    Generator,
    frozen,
    optimise,
    play,
    sample,
    smoke_game,
    smoke_teacher,
    teacher_module,
)
from lfm.distill.losses import KDConfig, kd_loss
from lfm.registry import register

# ------------------------------------------------------------------------------------------
# DeepInversion


class DeepInversionConfig(Config):
    steps: int = Field(2000, ge=1)  # Adam iterations on the pixels (paper, ImageNet: 2k)
    lr: float = Field(0.1, gt=0)  # Adam learning rate on the pixels
    bn_weight: float = Field(0.05, ge=0)  # β_f, weight of the BatchNorm-statistics term
    tv_weight: float = Field(1e-4, ge=0)  # α_tv, weight of the total-variation prior
    l2_weight: float = Field(1e-5, ge=0)  # α_l2, weight of the ‖x̂‖² prior
    batch_size: int = Field(64, ge=2)  # images optimised together (their BN statistics matter)
    competition_weight: float = Field(0.0, ge=0)  # α_c, Adaptive DeepInversion's term (0: off)
    pixel_min: float = 0.0  # images are clamped to [pixel_min, pixel_max] after each step
    pixel_max: float = 1.0


@contextmanager
def bn_statistics(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, per BatchNorm layer and forward pass, `‖μ − μ_BN‖₂ + ‖σ² − σ²_BN‖₂`."""
    terms: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = inp[0].float()  # (B, C, H, W)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        terms.append((mean - mod.running_mean).norm() + (var - mod.running_var).norm())

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """R_TV: mean squared difference between vertical and between horizontal neighbours."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
    return dh + dw


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence between the softmaxes of two logit rows, mean over rows."""
    p, q = logits_p.softmax(-1), logits_q.softmax(-1)
    log_m = (0.5 * (p + q)).clamp_min(1e-12).log()
    kl = F.kl_div(log_m, p, reduction="batchmean") + F.kl_div(log_m, q, reduction="batchmean")
    return 0.5 * kl


def deep_inversion_loss(
    teacher: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    cfg: DeepInversionConfig,
    student: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """`{"loss", "ce", "bn", "tv", "l2"[, "comp"]}` of images `x` (B, C, H, W) for targets."""
    with bn_statistics(teacher) as terms:
        logits = teacher(x)
    parts = {
        "ce": F.cross_entropy(logits, targets),
        "bn": torch.stack(terms).sum() if terms else x.new_zeros(()),
        "tv": total_variation(x),
        "l2": x.pow(2).flatten(1).sum(1).mean(),
    }
    loss = parts["ce"] + cfg.bn_weight * parts["bn"] + cfg.tv_weight * parts["tv"]
    if student is not None and cfg.competition_weight > 0:
        parts["comp"] = 1 - js_divergence(logits, student(x))
        loss = loss + cfg.competition_weight * parts["comp"]
    return {"loss": loss + cfg.l2_weight * parts["l2"], **{k: v.detach() for k, v in parts.items()}}


def _smoke_di(cfg: DeepInversionConfig, seed: int) -> torch.Tensor:
    cfg = cfg.replace(steps=5, batch_size=4)
    return deep_inversion(smoke_teacher(seed), (1, 8, 8), 10, cfg, seed=seed)[0]


@register(
    "distill", "deep_inversion", branch="noise optimisation", access=Access.WEIGHTS,
    config=DeepInversionConfig, paper="Yin et al. 2020, arXiv 1912.08795", smoke=_smoke_di,
)  # fmt: skip
def deep_inversion(
    teacher: Any,
    shape: tuple[int, ...],
    n_classes: int,
    cfg: DeepInversionConfig = DeepInversionConfig(),
    seed: int = 0,
    targets: torch.Tensor | None = None,
    student: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Synthesise one batch of images from the teacher; returns (images, targets, history).

    Args:
        teacher: a `LocalClassifier` (WEIGHTS) or a bare module with BatchNorm layers.
        shape: the shape of one image (C, H, W).
        n_classes: the teacher's classes; targets cycle through them unless given.
        cfg: iterations, learning rate, loss weights and pixel range.
        seed: seeds the initial noise.
        targets: (batch_size,) target classes.
        student: the current student, for the competition term (used when α_c > 0).
    """
    model = teacher_module(teacher, Access.WEIGHTS, "distill/deep_inversion")
    rival = frozen(student) if student is not None else nullcontext()
    g = torch.Generator().manual_seed(seed)
    if targets is None:
        targets = torch.arange(cfg.batch_size) % n_classes
    x = torch.randn((len(targets), *shape), generator=g).clamp(cfg.pixel_min, cfg.pixel_max)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    history = []
    with frozen(model), rival:
        for _ in range(cfg.steps):
            out = deep_inversion_loss(model, x, targets, cfg, student)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(cfg.pixel_min, cfg.pixel_max)
            history.append({k: float(v.detach()) for k, v in out.items()})
    return x.detach(), targets, history


def deep_inversion_distill(
    teacher: Any,
    student: nn.Module,
    shape: tuple[int, ...],
    n_classes: int,
    batches: int,
    cfg: DeepInversionConfig = DeepInversionConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    temperature: float = 4.0,
    seed: int = 0,
) -> torch.Tensor:
    """Synthesise `batches` batches and train `student` in place by KD on them; returns the images.

    Without competition (α_c = 0) all batches are synthesised first and the student then takes
    `train_cfg.steps` KD steps on the whole set. With it, each batch is synthesised against the
    current student, which then takes `train_cfg.steps // batches` steps on the images so far.

    Args:
        teacher: a `LocalClassifier` (WEIGHTS) or a bare module with BatchNorm layers.
        student: the module trained (in place).
        shape: the shape of one image (C, H, W).
        n_classes: the teacher's classes.
        batches: the number of synthesised batches of `cfg.batch_size` images.
        cfg: the synthesis config.
        train_cfg: the KD training loop's config (steps in all, learning rate, seed).
        temperature: the KD temperature.
        seed: batch b starts from the noise of seed `seed + b`.
    """
    handle = LocalClassifier(teacher) if isinstance(teacher, nn.Module) else teacher
    rounds = batches if cfg.competition_weight > 0 else 1
    pool: list[torch.Tensor] = []
    for b in range(batches):
        rival = student if rounds > 1 else None
        pool.append(deep_inversion(handle, shape, n_classes, cfg, seed + b, student=rival)[0])
        if rounds > 1 or b == batches - 1:
            images = torch.cat(pool)  # (N, C, H, W)
            steps = max(1, train_cfg.steps // rounds)
            loader = shuffled_batches(
                images, batch_size=min(cfg.batch_size, len(images)), seed=seed + b
            )
            losses = [("kd", 1.0, {"temperature": temperature})]
            distill(handle, student.train(), loader, losses, train_cfg.replace(steps=steps))
    return torch.cat(pool)


# ------------------------------------------------------------------------------------------
# DAFL


class DAFLConfig(Config):
    iterations: int = Field(1000, ge=1)  # generator updates (each followed by student updates)
    student_steps: int = Field(1, ge=1)  # student updates per generator update
    batch_size: int = Field(64, ge=2)  # generated images per update
    nz: int = Field(100, ge=1)  # latent size (paper: 100)
    lr_g: float = Field(1e-3, gt=0)  # Adam learning rate of the generator
    lr_s: float = Field(1e-3, gt=0)  # Adam learning rate of the student
    activation_weight: float = Field(0.1, ge=0)  # α, activation loss (paper: 0.1)
    entropy_weight: float = Field(5.0, ge=0)  # β, information-entropy loss (paper: 5)
    temperature: float = Field(1.0, gt=0)  # KD temperature of the student's loss
    generator_width: int = Field(64, ge=1)  # w of the default `Generator` (paper: 64, 32×32 RGB)
    feature_module: str = "pool"  # teacher module whose output is f_T (the penultimate features)


def dafl_generator_loss(
    logits: torch.Tensor, features: torch.Tensor, cfg: DAFLConfig
) -> dict[str, torch.Tensor]:
    """`{"loss", "oh", "a", "ie"}`: L_oh + α L_a + β L_ie of teacher logits and features."""
    oh = F.cross_entropy(logits, logits.argmax(-1))
    a = -features.abs().mean()
    p_mean = logits.softmax(-1).mean(0)
    ie = (p_mean * p_mean.clamp_min(1e-12).log()).sum()  # −H(p̄): lowest for balanced classes
    loss = oh + cfg.activation_weight * a + cfg.entropy_weight * ie
    return {"loss": loss, "oh": oh.detach(), "a": a.detach(), "ie": ie.detach()}


@register(
    "distill", "dafl", branch="generative reconstruction", access=Access.WEIGHTS,
    config=DAFLConfig, paper="Chen et al. 2019, arXiv 1904.01186",
    smoke=lambda cfg, seed: smoke_game(dafl, cfg, seed),
)  # fmt: skip
def dafl(
    teacher: Any,
    student: nn.Module,
    cfg: DAFLConfig = DAFLConfig(),
    generator: Generator | None = None,
    seed: int = 0,
) -> GameResult:
    """Train a generator with the DAFL losses and the student with KD on its images, in place.

    Args:
        teacher: a `LocalClassifier` (WEIGHTS) or a bare module; `cfg.feature_module` names f_T.
        student: the module trained (in place).
        cfg: iterations, learning rates, loss weights.
        generator: the generator (default: a 1×28×28 `Generator` of width `cfg.generator_width`).
        seed: seeds the generator's initialisation and the latent draws.
    """
    model = teacher_module(teacher, Access.WEIGHTS, "distill/dafl")
    torch.manual_seed(seed)
    gen = generator if generator is not None else Generator(cfg.nz, width=cfg.generator_width)
    g = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_s)
    kd_cfg = KDConfig(temperature=cfg.temperature)

    def generator_step() -> dict[str, float]:
        with capture(model, [cfg.feature_module], detach=False) as acts:
            logits = model(sample(gen, cfg.batch_size, g))
        out = dafl_generator_loss(logits, acts[cfg.feature_module], cfg)
        optimise(opt_g, out["loss"])
        return {f"g_{k}": float(v.detach()) for k, v in out.items()}

    def student_step() -> dict[str, float]:
        with torch.no_grad():
            x = sample(gen, cfg.batch_size, g)
            t_logits = model(x)
        loss = kd_loss(student.train()(x), t_logits, kd_cfg)
        optimise(opt_s, loss)
        return {"s_kd": float(loss.detach())}

    with frozen(model):
        history = play(cfg.iterations, cfg.student_steps, generator_step, student_step)
    n = cfg.iterations * cfg.batch_size * (1 + cfg.student_steps)
    return GameResult(student.eval(), gen.eval(), history, n)
