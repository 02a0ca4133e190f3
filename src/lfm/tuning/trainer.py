"""The training path the weight-engineering tuners share, over the Accelerate loop.

    result = lora(handle, TextClassification(texts, labels, verbalizer), train_cfg=TrainConfig(steps=40))

Each tuner (`full_ft`, `bitfit`, `lp_ft`, `wise_ft`, `lora` ...) calls `tune_weights` with what
makes it that method: how to prepare the backbone (which parameters train, which adapter PEFT
injects) and, for LP-FT and WiSE-FT, its own schedule. The rest is shared: the module to train
follows from the data (label words of a causal LM, a new head on an encoder, or the LM itself for
instruction rows, with the matching loss), the batches, the evaluation and the record.

A freshly initialised head (`HeadClassifier` on an encoder) trains at its own learning rate,
`head_lr` (default 1e-3, the probing lr of LP-FT and a common choice for a new linear layer), through
the loop's `lr_groups`: at an adapter's 2e-4 a random head barely moves in a few dozen steps, and the
classifier stays at chance whatever the adapter learns.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lfm.access import module_of
from lfm.config import Config
from lfm.core.train import History, LossFn, TrainConfig, train
from lfm.errors import ConfigError
from lfm.runs import Run
from lfm.tuning.adapters import is_causal
from lfm.tuning.classify import (
    HeadClassifier,
    VerbalizerLM,
    accuracy_fn,
    batch_order,
    ce_loss,
    class_batches,
    label_token_ids,
    predict,
    seeded,
)
from lfm.tuning.results import TunedModel
from lfm.tuning.sft import sft_batches, sft_loss
from lfm.tuning.tasks import Instructions, TextClassification

HEAD_LR = 1e-3  # learning rate of a new classification head (LP-FT's probing lr)
HEAD_PATTERN = r"^head\."  # HeadClassifier's head parameters, for `TrainConfig.lr_groups`
EVAL_BATCH = 8

Data = TextClassification | Instructions
WEIGHT_DATA = {TextClassification: "a TextClassification", Instructions: "Instructions"}
Evaluate = Callable[..., dict[str, float]]  # (model, desc=None): `desc` shows a progress bar


class Schedule(Protocol):
    """How a tuner trains the prepared module: one run of the loop (`fit`), or LP-FT's stages."""

    def __call__(
        self, model: nn.Module, loss_fn: LossFn, batches: Any, tcfg: TrainConfig, *,
        run: Run | None, evaluate: Evaluate | None, head_lr: float | None, metrics: dict,
    ) -> History: ...  # fmt: skip


def set_trainable(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> int:
    """Set `requires_grad = keep(name, p)` on every parameter; return how many elements train."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        n += p.numel() if p.requires_grad else 0
    return n


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `model`'s state dict (WiSE-FT's zero-shot endpoint)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def classifier(backbone: nn.Module, tokenizer: Any, data: Data, seed: int = 0) -> nn.Module:
    """The module to train on `data`: label words of a causal LM, a new head on an encoder, or
    the causal LM itself for instruction rows."""
    causal = is_causal(backbone)
    if isinstance(data, Instructions):
        if not causal:
            raise ConfigError("instruction tuning trains a causal LM, not an encoder")
        return backbone
    if causal:
        words = data.needs_verbalizer("a causal LM").label_words
        return VerbalizerLM(backbone, label_token_ids(tokenizer, words))
    return HeadClassifier(backbone, data.classes, seed=seed)


def batches_of(tokenizer: Any, data: Data, batch_size: int, seed: int) -> tuple[list, LossFn]:
    """Mini-batches shuffled once by `seed`, and the loss the data's type calls for."""
    if isinstance(data, Instructions):
        return sft_batches(tokenizer, data.rows, batch_size, seed), sft_loss
    prompts = data.prompts()
    return class_batches(
        tokenizer, prompts, data.labels, batch_size, seed, data.max_tokens
    ), ce_loss


def evaluator(tokenizer: Any, data: Data | None) -> Evaluate | None:
    """`f(model) -> {"acc": ...}` on held-out classification data, `{"loss": ...}` on instructions."""
    if data is None:
        return None
    if isinstance(data, Instructions):
        batches = sft_batches(tokenizer, data.rows, EVAL_BATCH)

        @torch.no_grad()
        def loss(model: nn.Module, desc: str | None = None) -> dict[str, float]:
            dev = next(model.parameters()).device
            bar = tqdm(batches, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)
            losses = [float(sft_loss(model, {k: v.to(dev) for k, v in b.items()})) for b in bar]
            return {"loss": sum(losses) / len(losses)}

        return loss
    ev = class_batches(
        tokenizer, data.prompts(), data.labels, EVAL_BATCH, max_length=data.max_tokens
    )
    acc = accuracy_fn(ev)
    return lambda model, desc=None: {"acc": acc(model, desc)}


def class_logits(
    model: nn.Module, tokenizer: Any, data: TextClassification, desc: str | None = None
) -> torch.Tensor:
    """Class logits (N, C) of `data`'s texts, in their order, batched as `evaluator` batches a
    held-out set (left padding moves a causal LM's positions, so the batches fix the logits):
    the same texts give the logits the run's evaluation saw."""
    ev = class_batches(
        tokenizer, data.prompts(), data.labels, EVAL_BATCH, max_length=data.max_tokens
    )
    logits = predict(model, ev, desc)
    out = torch.empty_like(logits)
    out[batch_order(len(data.texts))] = logits
    return out


def with_head_lr(model: nn.Module, tcfg: TrainConfig, head_lr: float | None) -> TrainConfig:
    """`tcfg` with a new head's parameters at `head_lr` (after the caller's own `lr_groups`)."""
    head = getattr(model, "head", None)
    if head_lr is None or not isinstance(model, HeadClassifier) or HEAD_PATTERN in tcfg.lr_groups:
        return tcfg
    if not any(p.requires_grad for p in head.parameters()):
        return tcfg
    return tcfg.replace(lr_groups={**tcfg.lr_groups, HEAD_PATTERN: head_lr})


def fit(
    model: nn.Module, loss_fn: LossFn, batches: Any, tcfg: TrainConfig, *, run: Run | None = None,
    evaluate: Evaluate | None = None, head_lr: float | None = HEAD_LR, metrics: dict | None = None,
) -> History:  # fmt: skip
    """One run of the loop, a new head at `head_lr` (None: `tcfg.lr`): the default schedule."""
    return train(model, loss_fn, batches, with_head_lr(model, tcfg, head_lr), run, evaluate)


def sub_run(run: Run | None, name: str) -> Run | None:
    """A run directory inside `run` for one stage of a schedule (its own checkpoints)."""
    return None if run is None else Run(name, path=run.path / name)


def train_config(cfg: Config, train_cfg: TrainConfig | None, seed: int) -> TrainConfig:
    """`train_cfg` as given, else the loop's defaults at the method's paper learning rate."""
    if train_cfg is not None:
        return train_cfg
    return TrainConfig(lr=getattr(cfg, "lr", TrainConfig().lr), seed=seed, progress=False)


def _final(hist: History) -> dict[str, float]:
    return {k: v for k, v in (hist.evals[-1] if hist.evals else {}).items() if k != "step"}


def _prepared(
    method: str, handle: Any, data: Data, prepare: Callable[[nn.Module], nn.Module], seed: int,
    inplace: bool,
) -> tuple[nn.Module, Any]:  # fmt: skip
    """The module to train (the handle's model or a copy, prepared under `seed`) and the tokenizer."""
    tokenizer = getattr(handle, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"tuning/{method} trains a model with its tokenizer: pass a LocalModel")
    backbone = module_of(handle, f"tuning/{method}")
    backbone = backbone if inplace else copy.deepcopy(backbone)
    if isinstance(data, TextClassification) and is_causal(backbone):
        data.needs_verbalizer("a causal LM")  # before any work
    with seeded(seed):
        backbone = prepare(backbone)
    return classifier(backbone, tokenizer, data, seed), tokenizer


def tune_weights(
    method: str, handle: Any, data: Data, cfg: Config,
    prepare: Callable[[nn.Module], nn.Module], *, train_cfg: TrainConfig | None = None,
    eval_data: Data | None = None, run: Run | None = None, seed: int = 0, batch_size: int = 4,
    head_lr: float | None = HEAD_LR, inplace: bool = False, schedule: Schedule = fit,
) -> TunedModel:  # fmt: skip
    """Prepare the handle's model for `method`, train it on `data`, return what was learnt.

    Args:
        method: the registry name, recorded in the result.
        handle: a white-box `LocalModel` (model and tokenizer).
        data: a `TextClassification` (cross-entropy over the classes) or `Instructions` (the
            response tokens' NLL).
        cfg: the method's resolved config.
        prepare: makes the backbone trainable for the method (returns it, or PEFT's wrapper);
            it runs under `seed`, so an adapter's initial values are the seed's.
        train_cfg: steps, lr and the loop's other settings; None: `TrainConfig` at `cfg.lr`.
        eval_data: held-out data evaluated before (label words only) and during training.
        run: a run directory for metrics and checkpoints (one holding a checkpoint is resumed).
        seed: the data order, a new head's and an adapter's initial values.
        batch_size: examples per micro-batch.
        head_lr: learning rate of an encoder's new head (None: `train_cfg.lr`).
        inplace: train the handle's own model (saves a copy's memory); else a deep copy.
        schedule: how to train (`fit`; LP-FT and WiSE-FT bring their own).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    for d in (data, eval_data):
        if d is not None:
            data_kind(d, method, WEIGHT_DATA)
    model, tokenizer = _prepared(method, handle, data, prepare, seed, inplace)
    batches, loss_fn = batches_of(tokenizer, data, batch_size, seed)
    evaluate = evaluator(tokenizer, eval_data)
    before: dict[str, Any] = {"trainable_parameters": trainable_parameters(model)}
    tcfg = train_config(cfg, train_cfg, seed)
    if evaluate is not None and isinstance(model, VerbalizerLM):  # a new head has no zero-shot
        shown = tcfg.progress and on_main_process()
        before["zero_shot_acc"] = evaluate(model, "zero-shot" if shown else None)["acc"]
    if run is not None:
        run.log(**before)
    extra: dict[str, Any] = {}
    hist = schedule(model, loss_fn, batches, tcfg, run=run, evaluate=evaluate, head_lr=head_lr,
                    metrics=extra)  # fmt: skip
    final = _final(hist)
    if evaluate is not None and not hist.evals:  # resumed from the last step: nothing trained here
        final = evaluate(model)
    metrics = {**before, **final, **extra}
    if run is not None:
        run.log(**{k: v for k, v in metrics.items() if k != "trainable_parameters"})
    verb = data.verbalizer if isinstance(data, TextClassification) else None
    return TunedModel(method=method, config=cfg, model=model.eval(), tokenizer=tokenizer,
                      verbalizer=verb, history=list(hist.losses), evals=list(hist.evals),
                      metrics=metrics)  # fmt: skip


def on_main_process() -> bool:
    """Whether this is the main process of a launch (`RANK` 0, or no launcher): the one whose
    progress bars show, as the loop's own bar does."""
    return os.environ.get("RANK", "0") == "0"


def data_kind(data: Any, method: str, kinds: Mapping[type, str]) -> None:
    """Refuse data of a type the method does not learn from, in one line."""
    if not isinstance(data, tuple(kinds)):
        names = " or ".join(kinds.values())
        raise ConfigError(f"tuning/{method} learns from {names}, not a {type(data).__name__}")
