"""One tuning interface over the shared Accelerate loop (`lfm.core.train.train`).

    model = classifier(load_model("smollm2-135m"), "lora", label_words=words)
    tune(model, batches, LoraCfg(), TrainConfig(steps=40, lr=LoraCfg().lr), run=Run("tune-lora"))

`apply_method` prepares a backbone for a registered method (an adapter or soft prompt injected by
PEFT, or a choice of trainable parameters); `tune` trains it with cross-entropy (or any loss, such
as SFT's) and runs LP-FT's two stages: min_head L(head; frozen features) for a share of the steps,
then min_θ L(θ) from there (Kumar et al. 2022, arXiv 2202.10054).

A freshly initialised head (`HeadClassifier` on an encoder) trains at its own learning rate,
`head_lr` (default 1e-3, the probing lr of LP-FT and a common choice for a new linear layer), through
the loop's `lr_groups`: at an adapter's 2e-4 a random head barely moves in a few dozen steps, and the
classifier stays at chance whatever the adapter learns. LP-FT's fine-tuning stage keeps one lr, as in
the paper, since its head has been fit by then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from lfm.access import LocalModel
from lfm.config import Config
from lfm.core.train import History, LossFn, TrainConfig, train
from lfm.errors import ConfigError
from lfm.registry import get, methods
from lfm.runs import Run
from lfm.tuning.classify import HeadClassifier, VerbalizerLM, ce_loss, label_token_ids, predict
from lfm.tuning.methods import LPFTConfig, set_trainable
from lfm.tuning.peft_methods import save_adapter

NOT_TRAINABLE = ("wise-ft",)  # applied to two trained models, not trained itself
HEAD_LR = 1e-3  # learning rate of a new classification head (LP-FT's probing lr)
HEAD_PATTERN = r"^head\."  # HeadClassifier's head parameters, for `TrainConfig.lr_groups`


def method_config(method: str, cfg: Config | dict | None = None) -> Config:
    """The validated config of a registered tuning method (paper defaults when `cfg` is None)."""
    spec = get(f"tuning/{method}")
    if isinstance(cfg, spec.config):
        return cfg
    return spec.config.build(dict(cfg or {}))


def apply_method(backbone: nn.Module, method: str, cfg: Config | None = None) -> nn.Module:
    """Prepare `backbone` for training with `method`: returns the module to wrap and train."""
    if method in NOT_TRAINABLE:
        raise ConfigError(
            f"{method} combines trained models; use lfm.tuning.methods.{method.replace('-', '_')}"
        )
    return get(f"tuning/{method}").fn(backbone, method_config(method, cfg))


def classifier(
    handle: LocalModel, method: str, cfg: Config | None = None, *,
    label_words: Sequence[str] | None = None, n_classes: int | None = None, seed: int = 0,
) -> nn.Module:  # fmt: skip
    """A trainable classifier: label words on a causal LM, or a new head on an encoder."""
    is_lm = (
        handle.model.get_output_embeddings() is not None
        if hasattr(handle.model, "get_output_embeddings")
        else False
    )
    if is_lm:
        if label_words is None:
            raise ConfigError("a causal LM classifies through label words; pass label_words")
        ids = label_token_ids(handle.tokenizer, label_words)
        return VerbalizerLM(apply_method(handle.model, method, cfg), ids)
    if n_classes is None:
        raise ConfigError("an encoder classifies through a new head; pass n_classes")
    return HeadClassifier(apply_method(handle.model, method, cfg), n_classes, seed=seed)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sub(run: Run | None, name: str) -> Run | None:
    return None if run is None else Run(name, path=run.path / name)


def _probe(
    model: nn.Module, loss_fn: LossFn, batches: Any, cfg: LPFTConfig, tcfg: TrainConfig, run
) -> History:
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
        return train(
            model,
            loss_fn,
            batches,
            tcfg.replace(steps=steps, lr=cfg.lp_lr, weight_decay=0.0, lr_groups={}),
            _sub(run, "lp"),
        )
    finally:
        for h in hooks:
            h.remove()
        set_trainable(model, lambda n, _p: before[n])


def with_head_lr(model: nn.Module, tcfg: TrainConfig, head_lr: float | None) -> TrainConfig:
    """`tcfg` with a new head's parameters at `head_lr` (after the caller's own `lr_groups`)."""
    head = getattr(model, "head", None)
    if head_lr is None or not isinstance(model, HeadClassifier) or HEAD_PATTERN in tcfg.lr_groups:
        return tcfg
    if not any(p.requires_grad for p in head.parameters()):
        return tcfg
    return tcfg.replace(lr_groups={**tcfg.lr_groups, HEAD_PATTERN: head_lr})


def tune(
    model: nn.Module, batches: Any, cfg: Config, tcfg: TrainConfig, run: Run | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None, loss_fn: LossFn = ce_loss,
    head_lr: float | None = HEAD_LR,
) -> History:  # fmt: skip
    """Train a prepared model; LP-FT runs its probing stage first (`tcfg.lr` is the FT stage's).

    Args:
        head_lr: learning rate of a `HeadClassifier`'s new head (None: `tcfg.lr`); not used by
            LP-FT, whose probing stage has its own `lp_lr`.
    """
    if not isinstance(cfg, LPFTConfig):
        return train(model, loss_fn, batches, with_head_lr(model, tcfg, head_lr), run, evaluate)
    if tcfg.steps < 2:
        raise ConfigError("LP-FT needs at least 2 steps (one to probe, one to fine-tune)")
    lp = _probe(model, loss_fn, batches, cfg, tcfg, run)
    ft_steps = tcfg.steps - len(lp.losses)
    ft = train(model, loss_fn, batches, tcfg.replace(steps=ft_steps), _sub(run, "ft"), evaluate)
    return History(lp.losses + ft.losses, ft.evals, lp.start_step)


def save_tuned(model: nn.Module, path: str | Path) -> Path:
    """Save a tuned classifier or LM: a PEFT adapter (checked non-empty) or the full weights."""
    path = Path(path)
    backbone = model.lm if isinstance(model, VerbalizerLM) else model
    backbone = backbone.encoder if isinstance(backbone, HeadClassifier) else backbone
    if isinstance(backbone, PeftModel):
        save_adapter(backbone, path / "adapter")
    else:
        backbone.save_pretrained(str(path / "model"))
    if isinstance(model, HeadClassifier):
        save_file(
            {k: v.contiguous() for k, v in model.head.state_dict().items()},
            str(path / "head.safetensors"),
        )
    return path


def smoke_tune(cfg: Config, seed: int) -> torch.Tensor:
    """Train a tiny Llama with the method of `cfg` for 2 steps; return its class logits."""
    from lfm.tuning.tiny import LABEL_IDS, tiny_batch, tiny_llama

    spec = next(s for s in methods("tuning") if type(cfg) is s.config)
    model = VerbalizerLM(spec.fn(tiny_llama(seed), cfg), LABEL_IDS)
    batch = tiny_batch(seed)
    tune(model, [batch], cfg, TrainConfig(steps=2, lr=cfg.lr, seed=seed, progress=False, cpu=True))  # type: ignore[attr-defined]
    return predict(model, [batch])
