"""MeZO (Malladi et al. 2023, arXiv 2305.17333): zeroth-order SGD with the memory of inference.

Each step draws z ~ N(0, I) over the tuned parameters θ from a seed s, and estimates the
gradient along z by two forward passes (SPSA):

    ĝ = (L(θ + εz) − L(θ − εz)) / (2ε),      θ ← θ − η · ĝ · z.

z is never stored: it is regenerated from s for each in-place perturbation (+εz, −2εz, +εz) and
for the update, so memory stays that of inference. Paper defaults: ε = 1e-3, η ∈ {1e-6, 1e-7} for
full-parameter tuning, 100k steps. It needs WEIGHTS access (it writes parameters) but no gradients,
and works over any parameter subset (a name pattern).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access, LocalModel, require
from lfm.config import Config
from lfm.registry import register
from lfm.tuning.tasks import Verbalizer


class MeZOConfig(Config):
    lr: float = Field(1e-6, gt=0)  # η (paper: 1e-6 or 1e-7 for full parameters)
    eps: float = Field(1e-3, gt=0)  # ε, the perturbation scale (paper: 1e-3)
    steps: int = Field(100_000, ge=1)  # optimisation steps (paper: 100k)
    params: str = ""  # regex over parameter names to tune ("" = all)
    weight_decay: float = Field(0.0, ge=0)  # decoupled, as in the paper's code-free description


def select(model: nn.Module, pattern: str) -> list[nn.Parameter]:
    """Parameters whose names match `pattern` (all for ""); an error when none do."""
    out = (
        [p for name, p in model.named_parameters() if re.search(pattern, name)]
        if pattern
        else list(model.parameters())
    )
    if not out:
        raise ValueError(f"no parameter name matches {pattern!r}")
    return list({id(p): p for p in out}.values())  # tied weights count once


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """θ ← θ + scale · z in place, with z regenerated from `seed` (same z for the same seed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device), alpha=scale)


@torch.no_grad()
def mezo_step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int,
              cfg: MeZOConfig) -> tuple[float, float]:  # fmt: skip
    """One MeZO step in place; returns (loss at θ+εz, projected gradient ĝ)."""
    perturb(params, seed, cfg.eps)
    plus = loss_fn()
    perturb(params, seed, -2 * cfg.eps)
    minus = loss_fn()
    perturb(params, seed, cfg.eps)  # back to θ (up to float rounding)
    grad = (plus - minus) / (2 * cfg.eps)
    if cfg.weight_decay:
        for p in params:
            p.mul_(1 - cfg.lr * cfg.weight_decay)
    perturb(params, seed, -cfg.lr * grad)
    return plus, grad


def label_loss_fn(
    model: LocalModel, texts: Sequence[str], y: torch.Tensor, verb: Verbalizer
) -> Callable[[], float]:
    """Cross-entropy of the gold label word (first token) among the label words, at the last position."""
    enc = model._batch([verb.prompt(t) for t in texts], side="left")
    ids = torch.tensor([model.encode(f" {w}")[0] for w in verb.label_words])
    # left padding puts every last token at -1: the output layer needs to run there only
    takes_keep = "logits_to_keep" in inspect.signature(model.model.forward).parameters
    keep = {"logits_to_keep": 1} if takes_keep else {}

    @torch.no_grad()
    def loss() -> float:
        logits = model.model(**enc, **keep).logits[:, -1, ids].float()
        return float(torch.nn.functional.cross_entropy(logits, y.to(logits.device)))

    return loss


@register("tuning", "mezo", branch="weight engineering", access=Access.WEIGHTS, config=MeZOConfig,
          paper="Malladi et al. 2023, Fine-Tuning LMs with Just Forward Passes, arXiv 2305.17333",
          smoke=lambda cfg, seed: _smoke(cfg, seed))  # fmt: skip
def mezo(model: Any, loss_fn: Callable[[], float], cfg: MeZOConfig = MeZOConfig(), seed: int = 0,
         log_every: int = 0) -> list[float]:  # fmt: skip
    """Tune `model` in place with MeZO; returns the loss at θ+εz of each step.

    Args:
        model: a white-box `LocalModel` (or a bare `nn.Module`); it is changed in place.
        loss_fn: the loss of the current parameters (a forward pass, no gradient).
        cfg: MeZO settings; `params` picks the tuned subset.
        seed: draws the per-step seeds.
        log_every: print the loss every so many steps (0: never).
    """
    if isinstance(model, LocalModel) or hasattr(model, "access"):
        require(model, Access.WEIGHTS, "tuning/mezo")
        model = model.model
    params = select(model, cfg.params)
    seeds = torch.randint(0, 2**31 - 1, (cfg.steps,), generator=torch.Generator().manual_seed(seed))
    history = []
    for step, s in enumerate(seeds.tolist()):
        history.append(mezo_step(params, loss_fn, s, cfg)[0])
        if log_every and step % log_every == 0:
            print(f"mezo step {step}: loss {history[-1]:.4f}")
    return history


def _smoke(cfg: MeZOConfig, seed: int) -> torch.Tensor:
    from lfm.tuning.blackbox_tiny import WORDS, tiny_lm, tiny_task

    lm, (texts, y) = tiny_lm(0), tiny_task()
    loss = label_loss_fn(lm, texts, y, Verbalizer("Article: {text}\nTopic:", WORDS))
    small = cfg.replace(steps=8, lr=1e-2, params=r"layers\.1\.")
    return torch.tensor([*mezo(lm, loss, small, seed), loss()])
