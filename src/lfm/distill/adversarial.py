"""Data-free adversarial distillation (survey branch "adversarial exploration").

- DFAD (Fang et al. 2019, arXiv 1912.11006): a generator G maximises the teacher–student
  discrepancy, the student minimises it:
      min_S max_G  E_z [ (1/n) ‖f_t(G(z)) − f_s(G(z))‖₁ ]     (mean absolute error on logits),
  with k = 5 student updates (SGD, lr 0.1) per generator update (Adam, lr 1e-3). The generator's
  gradient flows through the teacher, so DFAD needs WEIGHTS access.
- DFME (Truong et al. 2021, arXiv 2011.14779): the same game against a teacher that answers only
  with scores (SCORES access). Logits are recovered from log-probabilities up to a per-row shift,
  `l ≈ log p − mean(log p)`. The generator's gradient w.r.t. its images is estimated by forward
  differences along m random unit directions u_i (m = 1, ε = 10⁻³ in the paper):
      ∇̂_x L(x) = (1/m) Σ_i d · (L(x + ε u_i) − L(x)) / ε · u_i,     d = dim(x)
  and back-propagated through G only. n_S = 5 student updates (SGD, lr 0.1) per generator update
  (Adam, lr 5e-4). The teacher is queried (m + 1)·B times per generator update and B times per
  student update; `info["queries"]` counts them and `query_budget` stops the game.

Both are distillers `(teacher, student, data, cfg)`: `data` is an `InputSpec` whose image shape
the default generator makes (None when a `generator` is given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access, module_of
from lfm.config import Config
from lfm.core.checkpoints import Checkpoints
from lfm.core.hooks import frozen
from lfm.distill.contract import DISTILLER, DistillResult, InputSpec
from lfm.distill.game import Game, game_example, game_generator, optimise, place, play, sample
from lfm.registry import register

BRANCH = "adversarial exploration"


class _GameConfig(Config):
    """The settings DFAD and DFME share (each method has its own config class below)."""

    iterations: int = Field(1000, ge=1)  # generator updates
    student_steps: int = Field(5, ge=1)  # k, student updates per generator update (paper: 5)
    batch_size: int = Field(256, ge=2)  # generated images per update (paper: 256)
    nz: int = Field(256, ge=1)  # latent size (paper: 256)
    lr_s: float = Field(0.1, gt=0)  # SGD (momentum 0.9) learning rate of the student (paper: 0.1)
    generator_width: int = Field(64, ge=1)  # w of the default `Generator` (papers: 64, 32×32 RGB)


class DFADConfig(_GameConfig):
    lr_g: float = Field(1e-3, gt=0)  # Adam learning rate of the generator (paper: 1e-3)


class DFMEConfig(_GameConfig):
    lr_g: float = Field(5e-4, gt=0)  # Adam learning rate of the generator (paper: 5e-4)
    directions: int = Field(1, ge=1)  # m, random directions per forward difference (paper: 1)
    eps: float = Field(1e-3, gt=0)  # ε, forward-difference step (paper: 1e-3)
    query_budget: int = Field(0, ge=0)  # stop once this many queries are spent (0: no limit)


# Two rounds of one student step on 1×8×8 images: the registry examples.
_SMALL = {"iterations": 2, "student_steps": 1, "batch_size": 4, "nz": 8, "generator_width": 4}


def discrepancy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between logits, per example: (B, C) → (B,)."""
    return (student_logits - teacher_logits).abs().mean(-1)


def logits_from_logprobs(log_probs: torch.Tensor) -> torch.Tensor:
    """DFME's logit recovery: log-probabilities centred per row (logits up to a shift)."""
    return log_probs - log_probs.mean(-1, keepdim=True)


def unit_directions(shape: tuple[int, ...], m: int, g: torch.Generator) -> torch.Tensor:
    """m random directions per example, uniform on the unit sphere: (m, B, ...)."""
    u = torch.randn((m, *shape), generator=g)
    norms = u.flatten(2).norm(dim=-1).view(m, shape[0], *([1] * (len(shape) - 1)))
    return u / norms


@torch.no_grad()
def forward_difference_grad(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, m: int, eps: float,
    g: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    """Zeroth-order estimate of ∇_x Σ_b f(x)_b from m + 1 evaluations of f per example.

    Args:
        f: maps a batch (B, ...) to per-example values (B,).
        x: the point (B, ...); each example gets its own directions.
        m: the number of random unit directions.
        eps: the forward-difference step ε.
        g: the random generator of the directions.
    """
    u = unit_directions(tuple(x.shape), m, g).to(x.device)  # (m, B, ...), drawn on the CPU
    f0 = f(x)  # (B,)
    fu = f((x.unsqueeze(0) + eps * u).flatten(0, 1)).view(m, len(x))  # (m, B)
    coef = x[0].numel() * (fu - f0) / eps  # (m, B)
    return (coef.view(*coef.shape, *([1] * (x.dim() - 1))) * u).mean(0)


def _game_parts(
    student: nn.Module, data: Any, cfg: Any, generator: nn.Module | None, seed: int, what: str,
    ckpt: Checkpoints | None, teacher: tuple[nn.Module, ...] = (),
) -> Game:  # fmt: skip
    """The game's generator and optimisers, the student, the generator and a white-box
    `teacher` moved to where it runs (`place`)."""
    torch.manual_seed(seed)
    gen = game_generator(data, generator, cfg.nz, cfg.generator_width, what)
    place(student, gen, *teacher)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g)
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr_s, momentum=0.9)
    optimizers = {"generator_optimizer": opt_g, "student_optimizer": opt_s}
    return Game(gen, student, optimizers, torch.Generator().manual_seed(seed), ckpt)


@register(
    "distill", "dfad", shape=DISTILLER, branch=BRANCH, access=Access.WEIGHTS, config=DFADConfig,
    paper="Fang et al. 2019, arXiv 1912.11006", example=game_example(DFADConfig(**_SMALL)),
    cli="lfm distill datafree --method dfad",
)  # fmt: skip
def dfad(
    teacher: Any,
    student: nn.Module,
    data: InputSpec | None,
    cfg: DFADConfig | None = None,
    *,
    generator: nn.Module | None = None,
    seed: int = 0,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
) -> DistillResult:
    """Adversarial data-free distillation with gradients through the teacher; trains in place.

    Args:
        teacher: a `LocalClassifier` or a module.
        student: the module trained (in place).
        data: the shape of one image, for the default generator (None when `generator` is given).
        cfg: iterations, k, batch size and learning rates (resolved by the registry).
        generator: the generator (default: a `Generator` of width `cfg.generator_width`).
        seed: seeds the generator's initialisation and the latent draws.
        progress: show a bar over the generator updates.
        ckpt: checkpoint the game into a run directory, and go on from the checkpoint there.

    Returns:
        the student (eval mode), the per-update discrepancies, and in `info` the `generator` and
        the teacher `queries`.
    """
    model = module_of(teacher)
    game = _game_parts(student, data, cfg, generator, seed, "distill/dfad", ckpt, (model,))
    gen, g, (opt_g, opt_s) = game.generator, game.rng, game.optimizers.values()

    def generator_step() -> dict[str, float]:
        x = sample(gen, cfg.batch_size, g)
        with frozen(student, train=True):  # gradients reach x through the student, not its weights
            loss = discrepancy(student(x), model(x)).mean()
        optimise(opt_g, -loss)
        return {"g_disc": float(loss.detach())}

    with frozen(model, train=False):
        history = play(cfg.iterations, cfg.student_steps, generator_step,
                       _student_step(gen, student, opt_s, cfg, g, lambda x: model(x)),
                       progress=progress, desc="dfad", game=game)  # fmt: skip
    n = cfg.iterations * cfg.batch_size * (1 + cfg.student_steps)
    return DistillResult(student.eval(), history, {"generator": gen.eval(), "queries": n})


def _student_step(gen, student, opt_s, cfg, g, teacher_logits: Callable) -> Callable:
    """One student update on fresh generated images: minimise the L1 discrepancy."""

    def step() -> dict[str, float]:
        with torch.no_grad():
            x = sample(gen, cfg.batch_size, g)
            t = teacher_logits(x)
        loss = discrepancy(student.train()(x), t).mean()
        optimise(opt_s, loss)
        return {"s_disc": float(loss.detach())}

    return step


@register(
    "distill", "dfme", shape=DISTILLER, branch=BRANCH, access=Access.SCORES, config=DFMEConfig,
    paper="Truong et al. 2021, arXiv 2011.14779", example=game_example(DFMEConfig(**_SMALL)),
    cli="lfm distill datafree --method dfme",
)  # fmt: skip
def dfme(
    teacher: Any,
    student: nn.Module,
    data: InputSpec | None,
    cfg: DFMEConfig | None = None,
    *,
    generator: nn.Module | None = None,
    seed: int = 0,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
) -> DistillResult:
    """Data-free model extraction from a scores-only teacher; trains the student in place.

    Args:
        teacher: any handle with SCORES access (`scores(x)` → log-probabilities (B, C)).
        student: the module trained (in place).
        data: the shape of one image, for the default generator (None when `generator` is given).
        cfg: iterations, n_S, directions, ε, learning rates and the query budget.
        generator: the generator (default: a `Generator` of width `cfg.generator_width`).
        seed: seeds the generator's initialisation, the latent draws and the directions.
        progress: show a bar over the generator updates.
        ckpt: checkpoint the game (with the queries spent) into a run directory, and go on from
            the checkpoint there.

    Returns:
        the student (eval mode), the per-update records, and in `info` the `generator` and the
        teacher `queries` spent (a resumed run's include those spent before its checkpoint).
    """
    game = _game_parts(student, data, cfg, generator, seed, "distill/dfme", ckpt)
    gen, g, (opt_g, opt_s) = game.generator, game.rng, game.optimizers.values()
    spent = game.counters
    spent["queries"] = 0

    def query(x: torch.Tensor) -> torch.Tensor:
        spent["queries"] += len(x)
        return logits_from_logprobs(teacher.scores(x.detach()).to(x.device).float())

    def loss_at(x: torch.Tensor) -> torch.Tensor:
        return discrepancy(student(x), query(x))

    def generator_step() -> dict[str, float]:
        x = sample(gen, cfg.batch_size, g)
        with frozen(student, train=False), torch.autocast(x.device.type, enabled=False):
            # per-example values in float32: a difference over ε = 1e-3 is lost in bfloat16
            grad = forward_difference_grad(loss_at, x.detach().float(), cfg.directions, cfg.eps, g)
        opt_g.zero_grad(set_to_none=True)
        x.backward(-grad / len(x))  # ascend the mean discrepancy
        opt_g.step()
        return {"queries": float(spent["queries"])}

    budget = cfg.query_budget or float("inf")
    history = play(cfg.iterations, cfg.student_steps, generator_step,
                   _student_step(gen, student, opt_s, cfg, g, query), progress=progress,
                   desc="dfme", game=game, stop=lambda: spent["queries"] >= budget)  # fmt: skip
    info = {"generator": gen.eval(), "queries": spent["queries"]}
    return DistillResult(student.eval(), history, info)
