"""MeZO (Malladi et al. 2023, arXiv 2305.17333): zeroth-order SGD with the memory of inference.

Each step draws z ~ N(0, I) over the tuned parameters θ from a seed s, and estimates the
gradient along z by two forward passes (SPSA):

    ĝ = (L(θ + εz) − L(θ − εz)) / (2ε),      θ ← θ − η · ĝ · z.

z is never stored: it is regenerated from s for each in-place perturbation (+εz, −2εz, +εz) and
for the update, so memory stays that of inference. Paper defaults: ε = 1e-3, η ∈ {1e-6, 1e-7} for
full-parameter tuning, 100k steps. It needs WEIGHTS access (it writes parameters) but no gradients,
and works over any parameter subset (a name pattern).

The tuner `mezo(handle, data)` minimises the label-word cross-entropy of a `TextClassification`
(the prompt-based fine-tuning loss of the paper) or the response NLL of `Instructions`, each over
the whole set per evaluation; `zero_order(model, loss_fn, cfg)` is the loop for any loss.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from lfm.access import Access, LocalModel, module_of
from lfm.config import Config
from lfm.errors import ConfigError
from lfm.registry import register
from lfm.runs import Run
from lfm.tuning.adapters import is_causal
from lfm.tuning.classify import VerbalizerLM, label_token_ids
from lfm.tuning.contract import TUNER
from lfm.tuning.results import TunedModel
from lfm.tuning.sft import sft_batches, sft_loss
from lfm.tuning.tasks import Instructions, TextClassification, Verbalizer
from lfm.tuning.tiny import example
from lfm.tuning.trainer import data_kind, evaluator, on_main_process


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
        raise ConfigError(f"no parameter name matches {pattern!r}")
    return list({id(p): p for p in out}.values())  # tied weights count once


def perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """θ ← θ + scale · z in place, with z regenerated from `seed` (same z for the same seed)."""
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device), alpha=scale)


def mezo_step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int,
              cfg: MeZOConfig) -> tuple[float, float]:  # fmt: skip
    """One MeZO step in place; returns (loss at θ+εz, projected gradient ĝ)."""
    with torch.no_grad():
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


def zero_order(model: nn.Module, loss_fn: Callable[[], float], cfg: MeZOConfig = MeZOConfig(),
               seed: int = 0, log_every: int = 0, progress: bool = False) -> list[float]:  # fmt: skip
    """Tune `model` in place with MeZO; returns the loss at θ+εz of each step.

    Args:
        model: the module whose parameters (those matching `cfg.params`) are tuned.
        loss_fn: the loss of the current parameters (a forward pass, no gradient).
        seed: draws the per-step seeds.
        log_every: print the loss every so many steps (0: never).
        progress: show a bar over the steps with the last loss (stderr).
    """
    params = select(model, cfg.params)
    seeds = torch.randint(0, 2**31 - 1, (cfg.steps,), generator=torch.Generator().manual_seed(seed))
    history = []
    bar = tqdm(seeds.tolist(), desc="mezo", disable=not progress, dynamic_ncols=True)
    for step, s in enumerate(bar):
        history.append(mezo_step(params, loss_fn, s, cfg)[0])
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if log_every and step % log_every == 0:
            print(f"mezo step {step}: loss {history[-1]:.4f}")
    return history


def label_loss_fn(
    model: LocalModel, texts: Sequence[str], y: torch.Tensor, verb: Verbalizer
) -> Callable[[], float]:
    """Cross-entropy of the gold label word (first token) among the label words, at the last position."""
    enc = model._batch([verb.prompt(t) for t in texts], side="left")
    ids = torch.tensor([model.encode(f" {w}")[0] for w in verb.label_words])
    # left padding puts every last token at -1: the output layer needs to run there only
    takes_keep = "logits_to_keep" in inspect.signature(model.model.forward).parameters
    keep = {"logits_to_keep": 1} if takes_keep else {}

    def loss() -> float:
        with torch.no_grad():
            logits = model.model(**enc, **keep).logits[:, -1, ids].float()
            return float(torch.nn.functional.cross_entropy(logits, y.to(logits.device)))

    return loss


def response_loss_fn(model: LocalModel, data: Instructions) -> Callable[[], float]:
    """The mean response NLL of every instruction row, in one batch."""
    batch = sft_batches(model.tokenizer, data.rows, len(data.rows))[0]
    batch = {k: v.to(model.device) for k, v in batch.items()}

    def loss() -> float:
        with torch.no_grad():
            return float(sft_loss(model.model, batch))

    return loss


def _loss(local: LocalModel, data: TextClassification | Instructions) -> Callable[[], float]:
    if isinstance(data, Instructions):
        return response_loss_fn(local, data)
    verb = data.needs_verbalizer("MeZO")
    return label_loss_fn(local, data.texts, data.labels, verb)


def mezo(
    handle: Any, data: TextClassification | Instructions, cfg: MeZOConfig | None = None, *,
    eval_data: TextClassification | Instructions | None = None, run: Run | None = None,
    seed: int = 0, inplace: bool = False, log_every: int = 0, progress: bool = False,
) -> TunedModel:  # fmt: skip
    """Tune the handle's causal LM with MeZO on `data` (label words, or instruction rows).

    Args:
        handle: a white-box `LocalModel` (MeZO writes the weights).
        data: the training set; one loss evaluation is a forward pass over all of it.
        cfg: MeZO settings; `params` picks the tuned subset, `steps` and `lr` the schedule.
        eval_data: held-out data, evaluated before and after.
        run: a run directory for the metrics.
        seed: draws the per-step seeds of z.
        inplace: tune the handle's own model; else a deep copy.
        log_every: print the loss every so many steps (0: never).
        progress: show bars over the zero-shot evaluation and the steps (stderr).
    """
    data_kind(
        data, "mezo", {TextClassification: "a TextClassification", Instructions: "Instructions"}
    )
    model = module_of(handle, "tuning/mezo")
    if not is_causal(model):
        raise ConfigError("MeZO here tunes a causal LM (label words or responses), not an encoder")
    local = LocalModel(model if inplace else copy.deepcopy(model), handle.tokenizer, handle.name)
    loss = _loss(local, data)
    clf = _classifier(local, data).eval()
    evaluate = evaluator(local.tokenizer, eval_data)
    tuned = sum(p.numel() for p in select(local.model, cfg.params))
    metrics: dict[str, Any] = {"trainable_parameters": tuned, "start_loss": loss()}
    if evaluate is not None:
        shown = "zero-shot" if progress and on_main_process() else None
        metrics.update({f"zero_shot_{k}": v for k, v in evaluate(clf, shown).items()})
    history = zero_order(local.model, loss, cfg, seed, log_every, progress)
    metrics["loss"] = loss()
    if evaluate is not None:
        metrics.update(evaluate(clf))
    if run is not None:
        run.log(**metrics)
    verb = data.verbalizer if isinstance(data, TextClassification) else None
    return TunedModel(method="mezo", config=cfg, model=clf.eval(), tokenizer=local.tokenizer,
                      verbalizer=verb, history=history, metrics=metrics)  # fmt: skip


mezo = register(
    "tuning", "mezo", shape=TUNER, branch="weight engineering", access=Access.WEIGHTS,
    config=MeZOConfig,
    paper="Malladi et al. 2023, Fine-Tuning LMs with Just Forward Passes, arXiv 2305.17333",
    example=example(MeZOConfig(steps=8, lr=1e-2, params=r"layers\.1\."), steps=None,
                    summary=lambda r: torch.tensor([*r.history, r.metrics["loss"]])),
    cli="lfm tuning train --method mezo",
)(mezo)  # fmt: skip


def _classifier(local: LocalModel, data: TextClassification | Instructions) -> nn.Module:
    """What was tuned, as the other tuners return it: label words over the LM, or the LM."""
    if isinstance(data, Instructions):
        return local.model
    words = data.needs_verbalizer("MeZO").label_words
    return VerbalizerLM(local.model, label_token_ids(local.tokenizer, words))
