"""Data-free distillation: noise optimisation and generative reconstruction (WEIGHTS access).

- DeepInversion (Yin et al. 2020, arXiv 1912.08795), branch "noise optimisation": images `x̂`
  (pixels as parameters) minimise
      L(x̂) = CE(f_t(x̂), y) + β_f · Σ_l (‖μ_l(x̂) − μ_l^BN‖₂ + ‖σ²_l(x̂) − σ²_l^BN‖₂)
             + α_tv · R_TV(x̂) + α_l2 · ‖x̂‖²
  where μ_l, σ²_l are the batch statistics of the input of the teacher's l-th BatchNorm layer and
  μ_l^BN, σ²_l^BN its running statistics (`lfm.core.priors.bn_prior`), and R_TV the paper's
  squared total variation (p = 2). The student then learns the teacher on `x̂` with KD
  (`deep_inversion`; `deep_inversion_images` is the synthesis alone). Adaptive DeepInversion adds
  α_c · (1 − JS(p_t(x̂), p_s(x̂))), so that new images are those on which the current student
  still disagrees with the teacher.
- DAFL (Chen et al. 2019, arXiv 1904.01186), branch "generative reconstruction": a generator G
  is trained through the fixed teacher with
      L_G = H_CE(y_T, argmax y_T) − α · mean|f_T| − β · H(mean_i softmax(y_T^i))
  (one-hot, activation and information-entropy losses, α = 0.1, β = 5), and the student learns
  the teacher on G(z) with KD, alternating with the generator.

The teacher is a `LocalClassifier` or a module (its parameters are never updated nor given
gradients); `data` is an `InputSpec` (the shape of one image and the number of classes).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from lfm.access import Access, LocalClassifier, module_of, narrow
from lfm.config import Config
from lfm.core import placement
from lfm.core.checkpoints import Checkpoints, prefixed
from lfm.core.hooks import capture, frozen
from lfm.core.priors import bn_prior, total_variation
from lfm.core.tiny import tiny_cnn
from lfm.core.train import History, TrainConfig, shuffled_batches
from lfm.distill.contract import DISTILLER, DistillResult, InputSpec
from lfm.distill.distiller import distill
from lfm.distill.game import Game, game_example, game_generator, optimise, place, play, sample
from lfm.distill.losses import KDConfig, kd_loss
from lfm.errors import LfmError
from lfm.registry import Example, register

DATAFREE_CLI = "lfm distill datafree --method {}"

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
    pixel_max: float = 1.0  # above pixel_min
    batches: int = Field(32, ge=1)  # batches synthesised for the student (2,048 images at 64)
    temperature: float = Field(4.0, gt=0)  # KD temperature of the student on the images

    @model_validator(mode="after")
    def _range(self) -> Self:
        if not self.pixel_min < self.pixel_max:
            raise ValueError(
                f"pixel_min ({self.pixel_min}) must be below pixel_max ({self.pixel_max})"
            )
        return self


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
    logits, bn = bn_prior(teacher, x)
    parts = {
        "ce": F.cross_entropy(logits, targets),
        "bn": bn,
        "tv": total_variation(x, p=2),
        "l2": x.pow(2).flatten(1).sum(1).mean(),
    }
    loss = parts["ce"] + cfg.bn_weight * parts["bn"] + cfg.tv_weight * parts["tv"]
    if student is not None and cfg.competition_weight > 0:
        parts["comp"] = 1 - js_divergence(logits, student(x))
        loss = loss + cfg.competition_weight * parts["comp"]
    return {"loss": loss + cfg.l2_weight * parts["l2"], **{k: v.detach() for k, v in parts.items()}}


def deep_inversion_images(
    teacher: Any,
    shape: tuple[int, ...],
    n_classes: int,
    cfg: DeepInversionConfig = DeepInversionConfig(),
    seed: int = 0,
    targets: torch.Tensor | None = None,
    student: nn.Module | None = None,
    bar: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Synthesise one batch of images from the teacher; returns (images, targets, history).

    Args:
        teacher: a `LocalClassifier` or a module with BatchNorm layers (WEIGHTS: the gradient
            flows through it).
        shape: the shape of one image (C, H, W).
        n_classes: the teacher's classes; targets cycle through them unless given.
        cfg: iterations, learning rate, loss weights and pixel range.
        seed: seeds the initial noise.
        targets: (batch_size,) target classes.
        student: the current student, for the competition term (used when α_c > 0).
        bar: a tqdm bar advanced by one per pixel update (None: no progress shown).
    """
    model = module_of(teacher, "DeepInversion's image synthesis")
    device = placement.loop_device(model)  # the chosen `--device`, else where the teacher is
    model.to(device)
    if student is not None:
        student.to(device)
    rival = frozen(student, train=False) if student is not None else nullcontext()
    g = torch.Generator().manual_seed(seed)
    if targets is None:
        targets = torch.arange(cfg.batch_size) % n_classes
    x = torch.randn((len(targets), *shape), generator=g).clamp(cfg.pixel_min, cfg.pixel_max)
    x, on = x.to(device).requires_grad_(True), targets.to(device)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    history = []
    with frozen(model, train=False), rival:
        for _ in range(cfg.steps):
            with placement.autocast(device):  # `--dtype`: the forward passes; the pixels fp32
                out = deep_inversion_loss(model, x, on, cfg, student)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(cfg.pixel_min, cfg.pixel_max)
            history.append({k: float(v.detach()) for k, v in out.items()})
            if bar is not None:
                bar.update()
    return x.detach().cpu(), targets, history  # kept on the CPU: the KD rounds batch them


Synthesised = tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]  # images, targets, record


def _image_spec(data: Any, what: str) -> InputSpec:
    if not isinstance(data, InputSpec) or data.n_classes < 1:
        raise LfmError(f"{what} needs data=InputSpec(shape, n_classes) with the teacher's classes")
    return data


def _di_example(level: Access, seed: int) -> Example:
    teacher = narrow(LocalClassifier(tiny_cnn(seed), "teacher"), level)
    student = tiny_cnn(seed + 1, warm=False, width=4)
    cfg = DeepInversionConfig(steps=3, batch_size=4, batches=2)
    train_cfg = TrainConfig(steps=2, lr=1e-2, seed=seed, progress=False)
    return Example(
        (teacher, student, InputSpec((1, 8, 8), 10)),
        {"train_cfg": train_cfg, "seed": seed},
        cfg,
        summary=lambda r: {"images": r.info["images"], "kd": [h.losses for h in r.history]},
    )


@register(
    "distill", "deep_inversion", shape=DISTILLER, branch="noise optimisation",
    access=Access.WEIGHTS, config=DeepInversionConfig, paper="Yin et al. 2020, arXiv 1912.08795",
    example=_di_example, cli=DATAFREE_CLI.format("deep_inversion"),
)  # fmt: skip
def deep_inversion(
    teacher: Any,
    student: nn.Module,
    data: InputSpec,
    cfg: DeepInversionConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    seed: int = 0,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
) -> DistillResult:
    """Synthesise `cfg.batches` batches from the teacher and train `student` in place by KD on them.

    Without competition (α_c = 0) all batches are synthesised first and the student then takes
    `train_cfg.steps` KD steps on the whole set. With it, each batch is synthesised against the
    current student, which then takes `train_cfg.steps // batches` steps on the images so far.

    Args:
        teacher: a `LocalClassifier` or a module with BatchNorm layers.
        student: the module trained (in place).
        data: the shape of one image (C, H, W) and the teacher's number of classes.
        cfg: the synthesis config, the number of batches and the KD temperature (resolved by the
            registry: None gives the defaults).
        train_cfg: the KD training loop's config (steps in all, learning rate, seed).
        seed: batch b starts from the noise of seed `seed + b`.
        progress: show a bar over the pixel updates (KD shows the loop's bar if `train_cfg` asks).
        ckpt: checkpoint into a run directory every `ckpt.every` batches (each with its KD round,
            if any) and after the last: the images, targets and synthesis records so far, the
            student and the KD histories; go on from the checkpoint there.

    Returns:
        the student (eval mode), the KD `History` of each round, and in `info` the `images`, their
        `targets`, the synthesis `history` of each batch and the teacher `queries` (forward passes
        on single images).
    """
    spec = _image_spec(data, "distill/deep_inversion")
    train_cfg = train_cfg or TrainConfig()
    rounds = cfg.batches if cfg.competition_weight > 0 else 1
    kd_cfg = train_cfg.replace(steps=max(1, train_cfg.steps // rounds))
    made: list[Synthesised] = []
    kd: list[History] = []
    start = _resume_synthesis(ckpt, student, made, kd) if ckpt is not None else 0
    bar = tqdm(total=cfg.batches * cfg.steps, initial=start * cfg.steps, disable=not progress,
               desc="deep_inversion synthesis", dynamic_ncols=True, leave=False)  # fmt: skip
    for b in range(start, cfg.batches):
        rival = student if rounds > 1 else None
        made.append(deep_inversion_images(teacher, spec.shape, spec.n_classes, cfg, seed + b,
                                          student=rival, bar=bar))  # fmt: skip
        if rounds > 1 or b == cfg.batches - 1:
            images = torch.cat([m[0] for m in made])  # (N, C, H, W): every batch so far
            kd.append(_kd_round(teacher, student, images, cfg, kd_cfg, seed + b))
        if ckpt is not None and ckpt.due(b + 1, cfg.batches):
            _save_synthesis(ckpt, b + 1, student, made, kd)
    bar.close()
    images = torch.cat([m[0] for m in made])
    kd_batch = min(cfg.batch_size, len(images)) * train_cfg.grad_accum
    queries = cfg.batches * cfg.batch_size * cfg.steps + rounds * kd_cfg.steps * kd_batch
    targets = torch.cat([m[1] for m in made])
    info = {"images": images, "targets": targets, "synthesis": [m[2] for m in made]}
    return DistillResult(student.eval(), kd, {**info, "queries": queries})


def _kd_round(
    teacher: Any,
    student: nn.Module,
    images: torch.Tensor,
    cfg: DeepInversionConfig,
    train_cfg: TrainConfig,
    seed: int,
) -> History:
    """KD of the student (train mode) on the images, reshuffled under `seed`."""
    loader = shuffled_batches(images, batch_size=min(cfg.batch_size, len(images)), seed=seed)
    losses = [("kd", 1.0, {"temperature": cfg.temperature})]
    return distill(teacher, student.train(), loader, losses, train_cfg)


def _save_synthesis(
    ckpt: Checkpoints, step: int, student: nn.Module, made: list[Synthesised], kd: list[History]
) -> None:
    """Checkpoint after batch `step`: the student, each batch's images, targets and synthesis
    record, and the KD rounds' histories."""
    tensors = prefixed("student", student)
    for b, (x, y, _) in enumerate(made):
        tensors.update({f"images/{b}": x, f"targets/{b}": y})
    rounds = [{"losses": h.losses, "evals": h.evals, "start_step": h.start_step} for h in kd]
    ckpt.write(step, tensors, synthesis=[m[2] for m in made], kd=rounds,
               torch_rng=torch.get_rng_state())  # fmt: skip


def _resume_synthesis(
    ckpt: Checkpoints, student: nn.Module, made: list[Synthesised], kd: list[History]
) -> int:
    """Restore the last checkpoint into `student`, `made` and `kd`; the batches done (0: none)."""
    state = ckpt.read(prefixed("student", student))
    if state is None:
        return 0
    step, saved = int(state["step"]), state["tensors"]
    made[:] = [(saved[f"images/{b}"], saved[f"targets/{b}"], state["synthesis"][b])
               for b in range(step)]  # fmt: skip
    kd[:] = [History(**h) for h in state["kd"]]
    torch.set_rng_state(state["torch_rng"])
    return step


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
    "distill", "dafl", shape=DISTILLER, branch="generative reconstruction", access=Access.WEIGHTS,
    config=DAFLConfig, paper="Chen et al. 2019, arXiv 1904.01186",
    example=game_example(DAFLConfig(iterations=2, batch_size=4, nz=8, generator_width=4,
                                    feature_module="bn2")),
    cli=DATAFREE_CLI.format("dafl"),
)  # fmt: skip
def dafl(
    teacher: Any,
    student: nn.Module,
    data: InputSpec | None,
    cfg: DAFLConfig | None = None,
    *,
    generator: nn.Module | None = None,
    seed: int = 0,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
) -> DistillResult:
    """Train a generator with the DAFL losses and the student with KD on its images, in place.

    Args:
        teacher: a `LocalClassifier` or a module; `cfg.feature_module` names f_T.
        student: the module trained (in place).
        data: the shape of one image, for the default generator (None when `generator` is given).
        cfg: iterations, learning rates, loss weights (resolved by the registry).
        generator: the generator (default: a `Generator` of width `cfg.generator_width`).
        seed: seeds the generator's initialisation and the latent draws.
        progress: show a bar over the generator updates.
        ckpt: checkpoint the game into a run directory, and go on from the checkpoint there.

    Returns:
        the student (eval mode), the per-update losses, and in `info` the `generator` and the
        teacher `queries`.
    """
    model = module_of(teacher)
    torch.manual_seed(seed)
    gen = game_generator(data, generator, cfg.nz, cfg.generator_width, "distill/dafl")
    place(student, gen, model)
    g = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_s)
    optimizers = {"generator_optimizer": opt_g, "student_optimizer": opt_s}
    game = Game(gen, student, optimizers, g, ckpt)
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

    with frozen(model, train=False):
        history = play(cfg.iterations, cfg.student_steps, generator_step, student_step,
                       progress=progress, desc="dafl", game=game)  # fmt: skip
    n = cfg.iterations * cfg.batch_size * (1 + cfg.student_steps)
    return DistillResult(student.eval(), history, {"generator": gen.eval(), "queries": n})
