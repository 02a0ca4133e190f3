"""Weight engineering without adapters: full fine-tuning, BitFit, LP-FT and WiSE-FT.

- Full fine-tuning: every parameter trains.
- BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): only the bias terms train (and a new task head).
  Llama-style models (SmolLM2) have no biases at all; there BitFit trains the normalisation weights
  (the RMSNorm gains, the closest per-feature affine terms) when `fallback="norms"`, and refuses
  with `fallback="error"`.
- LP-FT (Kumar et al. 2022, arXiv 2202.10054): first fit the head with the features frozen (linear
  probing), min_head L(head; frozen features), for a share of the steps, then fine-tune everything
  from there, min_θ L(θ), so the features are not distorted by gradients through a random head.
- WiSE-FT (Wortsman et al. 2021, arXiv 2109.01903): fine-tune, then interpolate the weights with
  the zero-shot ones, θ_α = (1 − α)·θ_zero-shot + α·θ_fine-tuned; `wise_curve` evaluates a grid of α.

Each is a tuner `(handle, data, cfg) -> TunedModel`; `data` is a `TextClassification` or
`Instructions` (SFT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access
from lfm.config import Config
from lfm.core.train import History, LossFn, TrainConfig, train
from lfm.errors import ConfigError
from lfm.registry import register
from lfm.runs import Run
from lfm.tuning.contract import TUNER
from lfm.tuning.results import TunedModel
from lfm.tuning.tasks import TextClassification
from lfm.tuning.tiny import example
from lfm.tuning.trainer import (
    Data,
    Evaluate,
    fit,
    set_trainable,
    snapshot,
    sub_run,
    train_config,
    tune_weights,
)

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
    # grid for the accuracy curve, each in [0, 1] (0: the zero-shot model, 1: the fine-tuned one)
    alphas: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field(
        (0.0, 0.25, 0.5, 0.75, 1.0), min_length=1
    )
    lr: float = Field(2e-5, gt=0)  # the fine-tuning run (full FT's)


def all_trainable(model: nn.Module) -> nn.Module:
    """Every parameter trains (in place)."""
    set_trainable(model, lambda _n, _p: True)
    return model


def _norm_params(model: nn.Module) -> set[str]:
    """Names of the parameters of normalisation modules."""
    out = set()
    for mname, mod in model.named_modules():
        if any(t in type(mod).__name__.lower() for t in NORM_TYPES):
            out |= {f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)}
    return out


def bias_only(model: nn.Module, cfg: BitFitConfig = BitFitConfig()) -> nn.Module:
    """Train only the biases (in place); on a bias-free model, the norms or a clear refusal."""
    names = [n for n, _ in model.named_parameters()]
    biases = {n for n in names if n.endswith("bias")}
    if not biases and cfg.fallback == "error":
        raise ConfigError(
            f"{type(model).__name__} has no bias parameters, so BitFit has nothing to train; "
            "set fallback='norms' to train the normalisation weights instead"
        )
    chosen = biases or _norm_params(model)
    if not chosen:
        raise ConfigError(f"{type(model).__name__} has neither biases nor norm weights to train")
    set_trainable(model, lambda n, _p: n in chosen)
    return model


def probe(
    model: nn.Module, loss_fn: LossFn, batches: Any, cfg: LPFTConfig, tcfg: TrainConfig,
    run: Run | None = None,
) -> History:  # fmt: skip
    """LP-FT's first stage: train only the head (masked rows for a verbaliser), no weight decay."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    set_trainable(model, lambda _n, _p: False)
    hooks = []
    for p, mask in model.head_parameters():  # type: ignore[operator]
        p.requires_grad_(True)
        if mask is not None:
            hooks.append(p.register_hook(lambda g, m=mask: g * m))
    steps = max(1, round(tcfg.steps * cfg.lp_fraction))
    try:
        lp = tcfg.replace(steps=steps, lr=cfg.lp_lr, weight_decay=0.0, lr_groups={})
        return train(model, loss_fn, batches, lp, run)
    finally:
        for h in hooks:
            h.remove()
        set_trainable(model, lambda n, _p: before[n])


def lp_ft_schedule(
    model: nn.Module, loss_fn: LossFn, batches: Any, tcfg: TrainConfig, *, run: Run | None,
    evaluate: Evaluate | None, head_lr: float | None, metrics: dict, cfg: LPFTConfig,
) -> History:  # fmt: skip
    """Probe the head, then fine-tune everything at `tcfg.lr` (the head was fit by then, so one
    lr, as in the paper; `head_lr` is not used)."""
    if tcfg.steps < 2:
        raise ConfigError("LP-FT needs at least 2 steps (one to probe, one to fine-tune)")
    lp = probe(model, loss_fn, batches, cfg, tcfg, sub_run(run, "lp"))
    ft_cfg = tcfg.replace(steps=tcfg.steps - len(lp.losses))
    ft = train(model, loss_fn, batches, ft_cfg, sub_run(run, "ft"), evaluate)
    evals = [{**e, "step": e["step"] + len(lp.losses)} for e in ft.evals]  # steps of the whole run
    # a resumed run began at the probe's checkpoint, plus the fine-tuning's once the probe was done
    return History(lp.losses + ft.losses, evals, lp.start_step + ft.start_step)


def interpolate_weights(
    zero_shot: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """θ_α = (1 − α)·θ_0 + α·θ_1 for every floating tensor (others are taken from `tuned`)."""
    if zero_shot.keys() != tuned.keys():
        diff = sorted(set(zero_shot) ^ set(tuned))[:3]
        raise ConfigError(
            f"WiSE-FT needs two state dicts with the same keys; they differ in {diff}"
        )
    return {
        k: torch.lerp(zero_shot[k], t, alpha) if t.is_floating_point() else t.clone()
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
        model.load_state_dict(interpolate_weights(zero_shot, tuned, a))
        curve.append((float(a), float(evaluate(model))))
    model.load_state_dict(dict(tuned))
    return curve


def wise_schedule(
    model: nn.Module, loss_fn: LossFn, batches: Any, tcfg: TrainConfig, *, run: Run | None,
    evaluate: Evaluate | None, head_lr: float | None, metrics: dict, cfg: WiseFTConfig,
) -> History:  # fmt: skip
    """Fine-tune, then load θ_α; with an evaluation, the fine-tuned model's metric and the curve."""
    theta0 = snapshot(model)
    hist = fit(model, loss_fn, batches, tcfg, run=run, evaluate=evaluate, head_lr=head_lr)
    theta1 = snapshot(model)
    if evaluate is not None:
        tuned = {k: v for k, v in (hist.evals or [evaluate(model)])[-1].items() if k != "step"}
        key = next(iter(tuned))  # "acc"; "loss" for instruction rows
        metrics["fine_tuned_" + key] = tuned[key]
        metrics["curve"] = wise_curve(model, theta0, theta1, lambda m: evaluate(m)[key], cfg.alphas)
    model.load_state_dict(interpolate_weights(theta0, theta1, cfg.alpha))
    if evaluate is not None:
        metrics.update(evaluate(model))
    return hist


_W = "weight engineering"


def full_ft(
    handle: Any, data: Data, cfg: FullFTConfig | None = None, *,
    train_cfg: TrainConfig | None = None, eval_data: Data | None = None, run: Run | None = None,
    seed: int = 0, **options: Any,
) -> TunedModel:  # fmt: skip
    """Fine-tune every parameter on `data` (options of `tune_weights`: batch_size, head_lr, inplace)."""
    return tune_weights("full_ft", handle, data, cfg, all_trainable, train_cfg=train_cfg,
                        eval_data=eval_data, run=run, seed=seed, **options)  # fmt: skip


full_ft = register(
    "tuning", "full_ft", shape=TUNER, branch=_W, access=Access.WEIGHTS, config=FullFTConfig,
    paper="Howard & Ruder 2018, arXiv 1801.06146", example=example(FullFTConfig()),
    cli="lfm tuning train --method full_ft",
)(full_ft)  # fmt: skip


def bitfit(
    handle: Any, data: Data, cfg: BitFitConfig | None = None, *,
    train_cfg: TrainConfig | None = None, eval_data: Data | None = None, run: Run | None = None,
    seed: int = 0, **options: Any,
) -> TunedModel:  # fmt: skip
    """Train only the biases (or the norm gains of a bias-free model) and a new head, if any."""
    prepare = partial(bias_only, cfg=cfg)
    return tune_weights("bitfit", handle, data, cfg, prepare, train_cfg=train_cfg,
                        eval_data=eval_data, run=run, seed=seed, **options)  # fmt: skip


bitfit = register(
    "tuning", "bitfit", shape=TUNER, branch=_W, access=Access.WEIGHTS, config=BitFitConfig,
    paper="Ben Zaken et al. 2021, arXiv 2106.10199", example=example(BitFitConfig()),
    cli="lfm tuning train --method bitfit",
)(bitfit)  # fmt: skip


def lp_ft(
    handle: Any, data: TextClassification, cfg: LPFTConfig | None = None, *,
    train_cfg: TrainConfig | None = None, eval_data: Data | None = None, run: Run | None = None,
    seed: int = 0, **options: Any,
) -> TunedModel:  # fmt: skip
    """Linear probing for `lp_fraction` of the steps (at `lp_lr`), then full fine-tuning
    (`train_cfg.lr`, by default the config's `lr`). Needs a head: label words or a new one."""
    if not isinstance(data, TextClassification):
        raise ConfigError("LP-FT probes a classification head; it takes a TextClassification")
    if (
        train_config(cfg, train_cfg, seed).steps < 2
    ):  # refused before any work, as the schedule does
        raise ConfigError("LP-FT needs at least 2 steps (one to probe, one to fine-tune)")
    schedule = partial(lp_ft_schedule, cfg=cfg)
    return tune_weights("lp_ft", handle, data, cfg, all_trainable, train_cfg=train_cfg,
                        eval_data=eval_data, run=run, seed=seed, schedule=schedule, **options)  # fmt: skip


lp_ft = register(
    "tuning", "lp_ft", shape=TUNER, branch=_W, access=Access.WEIGHTS, config=LPFTConfig,
    paper="Kumar et al. 2022, arXiv 2202.10054", example=example(LPFTConfig()),
    cli="lfm tuning train --method lp_ft",
)(lp_ft)  # fmt: skip


def wise_ft(
    handle: Any, data: Data, cfg: WiseFTConfig | None = None, *,
    train_cfg: TrainConfig | None = None, eval_data: Data | None = None, run: Run | None = None,
    seed: int = 0, **options: Any,
) -> TunedModel:  # fmt: skip
    """Fine-tune every parameter, then return θ_α; with `eval_data`, the metrics hold the
    fine-tuned model's score and the curve over `cfg.alphas`."""
    schedule = partial(wise_schedule, cfg=cfg)
    return tune_weights("wise_ft", handle, data, cfg, all_trainable, train_cfg=train_cfg,
                        eval_data=eval_data, run=run, seed=seed, schedule=schedule, **options)  # fmt: skip


wise_ft = register(
    "tuning", "wise_ft", shape=TUNER, branch=_W, access=Access.WEIGHTS, config=WiseFTConfig,
    paper="Wortsman et al. 2021, arXiv 2109.01903", example=example(WiseFTConfig()),
    cli="lfm tuning train --method wise_ft",
)(wise_ft)  # fmt: skip
