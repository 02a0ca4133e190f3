"""Weight engineering without adapters: full fine-tuning, BitFit, LP-FT and WiSE-FT.

- Full fine-tuning: every parameter trains.
- BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): only the bias terms train (and a new task head).
  Llama-style models (SmolLM2) have no biases at all; there BitFit trains the normalisation weights
  (the RMSNorm gains, the closest per-feature affine terms) when `fallback="norms"`, and refuses
  with `fallback="error"`.
- LP-FT (Kumar et al. 2022, arXiv 2202.10054): first fit the head with the features frozen (linear
  probing), then fine-tune everything from there, so the features are not distorted by gradients
  through a random head.
- WiSE-FT (Wortsman et al. 2021, arXiv 2109.01903): θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned;
  `wise_curve` evaluates a grid of α.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access
from lfm.config import Config
from lfm.errors import ConfigError
from lfm.registry import register

NORM_TYPES = ("norm", "layernorm", "rmsnorm")


class FullFTConfig(Config):
    lr: float = Field(2e-5, gt=0)  # AdamW learning rate (BERT / LM-BFF: 1e-5 to 5e-5)


class BitFitConfig(Config):
    fallback: Literal["norms", "error"] = "norms"  # a model without biases: train norms, or refuse
    lr: float = Field(1e-3, gt=0)  # paper: 1e-4 to 1e-3


class LPFTConfig(Config):
    lp_fraction: float = Field(0.5, gt=0, lt=1)  # share of the steps spent linear probing
    lp_lr: float = Field(1e-3, gt=0)  # learning rate of the probing stage (head only)
    lr: float = Field(2e-5, gt=0)  # fine-tuning stage (paper: a small lr, as full FT)


class WiseFTConfig(Config):
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the fine-tuned model (paper: 0.5)
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # grid for the accuracy curve


def set_trainable(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> int:
    """Set `requires_grad = keep(name, p)` on every parameter; return how many elements train."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        n += p.numel() if p.requires_grad else 0
    return n


def full_ft(model: nn.Module, cfg: FullFTConfig | LPFTConfig = FullFTConfig()) -> nn.Module:
    """Make every parameter trainable (in place); LP-FT's schedule lives in `tune`."""
    set_trainable(model, lambda _n, _p: True)
    return model


def _is_norm(model: nn.Module) -> set[str]:
    """Names of the parameters of normalisation modules."""
    out = set()
    for mname, mod in model.named_modules():
        if any(t in type(mod).__name__.lower() for t in NORM_TYPES):
            out |= {f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)}
    return out


def bitfit(model: nn.Module, cfg: BitFitConfig = BitFitConfig()) -> nn.Module:
    """Train only the biases (in place); on a bias-free model, the norms or a clear refusal."""
    names = [n for n, _ in model.named_parameters()]
    biases = {n for n in names if n.endswith("bias")}
    if not biases and cfg.fallback == "error":
        raise ConfigError(
            f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train; "
            "set fallback='norms' to train the normalisation weights instead"
        )
    chosen = biases or _is_norm(model)
    if not chosen:
        raise ConfigError(f"{type(model).__name__} has neither biases nor norm weights to train")
    set_trainable(model, lambda n, _p: n in chosen)
    return model


def wise_ft(
    zero_shot: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], cfg: WiseFTConfig
) -> dict[str, torch.Tensor]:
    """θ_α = (1 − α)·θ_0 + α·θ_1 for every floating tensor (others are taken from `tuned`)."""
    if zero_shot.keys() != tuned.keys():
        diff = sorted(set(zero_shot) ^ set(tuned))[:3]
        raise ConfigError(
            f"WiSE-FT needs two state dicts with the same keys; they differ in {diff}"
        )
    a = cfg.alpha
    return {
        k: torch.lerp(zero_shot[k], t, a) if t.is_floating_point() else t.clone()
        for k, t in tuned.items()
    }


def wise_curve(
    model: nn.Module,
    zero_shot: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    alphas: Sequence[float] = WiseFTConfig().alphas,
) -> list[tuple[float, float]]:
    """Load θ_α into `model` for each α and evaluate; the model ends holding θ_1."""
    curve = []
    for a in alphas:
        model.load_state_dict(wise_ft(zero_shot, tuned, WiseFTConfig(alpha=a)))
        curve.append((float(a), float(evaluate(model))))
    model.load_state_dict(dict(tuned))
    return curve


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `model`'s state dict (for WiSE-FT's zero-shot endpoint)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _smoke(cfg: Config, seed: int) -> torch.Tensor:
    from lfm.tuning.trainer import smoke_tune

    return smoke_tune(cfg, seed)


def _smoke_wise(cfg: WiseFTConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = {"w": torch.randn(3, 4, generator=g), "step": torch.tensor(2)}
    b = {"w": torch.randn(3, 4, generator=g), "step": torch.tensor(5)}
    return wise_ft(a, b, cfg)


_W = "weight engineering"
register("tuning", "full-ft", branch=_W, access=Access.WEIGHTS, config=FullFTConfig,
         paper="Howard & Ruder 2018, arXiv 1801.06146", smoke=_smoke)(full_ft)  # fmt: skip
register("tuning", "bitfit", branch=_W, access=Access.WEIGHTS, config=BitFitConfig,
         paper="Ben Zaken et al. 2021, arXiv 2106.10199", smoke=_smoke)(bitfit)  # fmt: skip
register("tuning", "lp-ft", branch=_W, access=Access.WEIGHTS, config=LPFTConfig,
         paper="Kumar et al. 2022, arXiv 2202.10054", smoke=_smoke)(full_ft)  # fmt: skip
register("tuning", "wise-ft", branch=_W, access=Access.WEIGHTS, config=WiseFTConfig,
         paper="Wortsman et al. 2021, arXiv 2109.01903", smoke=_smoke_wise)(wise_ft)  # fmt: skip
