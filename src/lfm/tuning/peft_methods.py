"""Adapters and soft prompts through PEFT: LoRA, DoRA, IA3, prompt tuning, prefix tuning.

- LoRA (Hu et al. 2021, arXiv 2106.09685): W' = W + (α/r)·B·A, A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0
  at start, so a target adds r·(in + out) trainable parameters.
- DoRA (Liu et al. 2024, arXiv 2402.09353): W' = m · (W + B·A) / ‖W + B·A‖_c, a learned magnitude
  per output column on top of LoRA's direction update.
- IA3 (Liu et al. 2022, arXiv 2205.05638): rescale keys, values and the feed-forward input by learned
  vectors, h' = l ⊙ h.
- Prompt tuning (Lester et al. 2021, arXiv 2104.08691): prepend n trainable input embeddings.
- Prefix tuning (Li & Liang 2021, arXiv 2101.00190): prepend n trainable key/value pairs per layer,
  h_i = P_θ[i] for i in the prefix. PEFT draws P_θ from N(0, 1), keys and values far from any the
  model produces, so a frozen LM starts from a wrecked context; the paper (its section 7.2) instead
  initialises the prefix with the activations of real words, which matters most with little data.
  `init="words"` (the default here) does that: P_θ = the model's own keys and values of n tokens
  sampled from its vocabulary (under the tuner's seed), so at step 0 the model reads those n tokens
  before its input.

Which adapter is built follows from the method's name (`ADAPTERS`), never from the config's
class: `lora` builds LoRA from any `LoraConfig`, a user's subclass included. Each config's
`to_peft` only translates its fields into PEFT's config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import peft
import torch
from peft import PeftModel, PromptTuningInit, TaskType
from peft.utils import constants as C
from pydantic import Field
from torch import nn

from lfm.access import Access
from lfm.config import Config
from lfm.core.seeding import seeded
from lfm.core.train import TrainConfig
from lfm.errors import ConfigError
from lfm.registry import get, register
from lfm.runs import Run
from lfm.tuning.adapters import (
    check_targets,
    default_targets,
    inject,
    is_causal,
    prefix_from_tokens,
    task_type,
)
from lfm.tuning.contract import TUNER
from lfm.tuning.results import TunedModel
from lfm.tuning.tiny import example
from lfm.tuning.trainer import Data, tune_weights


class _LowRankConfig(Config):
    r: int = Field(8, ge=1)  # rank of B·A (paper: 4-8 suffice on GPT-3)
    alpha: float = Field(16.0, gt=0)  # scale α; the update is multiplied by α/r
    dropout: float = Field(0.05, ge=0, lt=1)  # dropout on the adapter's input
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default per architecture (q, v)
    lr: float = Field(2e-4, gt=0)  # AdamW learning rate (paper: 2e-4 for GPT-2)

    def to_peft(self, task: TaskType | None) -> peft.LoraConfig:
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type=task,
            target_modules=list(self.target_modules) if self.target_modules else None,
        )  # fmt: skip


class LoraConfig(_LowRankConfig):
    """LoRA's settings."""


class DoraConfig(_LowRankConfig):
    """DoRA's settings (LoRA's, plus the magnitude DoRA always learns)."""


class IA3Config(Config):
    target_modules: tuple[str, ...] | None = None  # None: keys, values, feed-forward (paper)
    feedforward_modules: tuple[str, ...] | None = None  # scaled on their input; None: default
    lr: float = Field(3e-3, gt=0)  # AdamW learning rate (T-Few paper: 3e-3)

    def to_peft(self, task: TaskType | None) -> peft.IA3Config:
        opt = {k: list(v) for k, v in self._targets().items() if v}
        return peft.IA3Config(task_type=task, **opt)

    def _targets(self) -> dict[str, tuple[str, ...] | None]:
        return {
            "target_modules": self.target_modules,
            "feedforward_modules": self.feedforward_modules,
        }


class PromptTuningConfig(Config):
    num_virtual_tokens: int = Field(20, ge=1)  # prompt length (paper: 20-100; 100 at its best)
    init: Literal["sample_vocab", "random"] = "sample_vocab"  # paper: sampled vocabulary
    lr: float = Field(3e-2, gt=0)  # paper: 0.3 with Adafactor; 3e-2 with AdamW here

    def to_peft(self, task: TaskType | None) -> peft.PromptTuningConfig:
        init = (
            PromptTuningInit.SAMPLE_VOCAB
            if self.init == "sample_vocab"
            else PromptTuningInit.RANDOM
        )
        return peft.PromptTuningConfig(
            task_type=task, num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init=init
        )


class PrefixTuningConfig(Config):
    num_virtual_tokens: int = Field(10, ge=1)  # prefix length (paper: 10 for table-to-text)
    projection: bool = False  # the paper's MLP reparameterisation (PEFT's prefix_projection)
    # "words": keys/values of sampled tokens (paper 7.2; a causal LM's cache, so encoders keep
    # PEFT's init); "random": PEFT's N(0, 1)
    init: Literal["words", "random"] = "words"
    lr: float = Field(1e-2, gt=0)  # paper: 5e-5 with the MLP; larger without it

    def to_peft(self, task: TaskType | None) -> peft.PrefixTuningConfig:
        if self.projection and self.init == "words":
            raise ConfigError(
                "prefix init='words' sets the keys and values directly; with projection=True "
                "set init='random'"
            )
        return peft.PrefixTuningConfig(
            task_type=task, num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.projection,
        )  # fmt: skip


def _lora(model: nn.Module, cfg: LoraConfig | DoraConfig, seed: int, dora: bool) -> PeftModel:
    mapping = C.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    check_targets(model, cfg.target_modules or default_targets(model, mapping, "LoRA"))
    peft_cfg = cfg.to_peft(task_type(model))
    peft_cfg.use_dora = dora  # by the method's name, whatever the config's class
    return inject(model, peft_cfg)


def _ia3(model: nn.Module, cfg: IA3Config, seed: int) -> PeftModel:
    tm = cfg.target_modules or default_targets(
        model, C.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, "IA3"
    )
    ff = cfg.feedforward_modules or default_targets(
        model, C.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, "IA3"
    )
    check_targets(model, tm)
    check_targets(model, ff)
    return inject(model, cfg.to_peft(task_type(model)))


def _prompt(model: nn.Module, cfg: PromptTuningConfig, seed: int) -> PeftModel:
    return inject(model, cfg.to_peft(task_type(model)))


def _prefix(model: nn.Module, cfg: PrefixTuningConfig, seed: int) -> PeftModel:
    peft_cfg = cfg.to_peft(task_type(model))
    return inject(model, peft_cfg, prefix=prefix_init(model, cfg, seed))


def prefix_init(model: nn.Module, cfg: PrefixTuningConfig, seed: int) -> torch.Tensor | None:
    """The flattened keys and values of `num_virtual_tokens` tokens drawn from the vocabulary
    under `seed`, or None where the config keeps PEFT's init (`init="random"`, an encoder)."""
    if cfg.init != "words" or not is_causal(model):
        return None
    vocab = model.config.vocab_size  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (cfg.num_virtual_tokens,), generator=g)
    return prefix_from_tokens(model, ids.to(model.device))


# method name -> how to wrap a backbone in its adapter or soft prompt
ADAPTERS: dict[str, Callable[[nn.Module, Any, int], PeftModel]] = {
    "lora": lambda m, c, s: _lora(m, c, s, dora=False),
    "dora": lambda m, c, s: _lora(m, c, s, dora=True),
    "ia3": _ia3,
    "prompt_tuning": _prompt,
    "prefix_tuning": _prefix,
}


def adapter(
    model: nn.Module, method: str, cfg: Config | dict | None = None, seed: int = 0
) -> PeftModel:
    """`model` wrapped (in place, by PEFT) in the adapter or soft prompt of `method`.

    Args:
        model: a causal LM or an encoder.
        method: lora, dora, ia3, prompt_tuning or prefix_tuning.
        cfg: the method's config (None: paper defaults; a mapping is validated).
        seed: the adapter's initial values (LoRA's A, a sampled prompt or prefix) are this seed's;
            the caller's random state is left as it was.
    """
    if method not in ADAPTERS:
        raise ConfigError(f"no PEFT adapter named {method!r}; choose from {', '.join(ADAPTERS)}")
    resolved = get(f"tuning/{method}").resolve(cfg)
    with seeded(seed):
        return ADAPTERS[method](model, resolved, seed)


def _tuner(method: str) -> Callable[..., TunedModel]:
    """The tuner of a PEFT method: its adapter injected, then trained by the shared path."""

    def tune(
        handle: Any, data: Data, cfg: Config | None = None, *,
        train_cfg: TrainConfig | None = None, eval_data: Data | None = None,
        run: Run | None = None, seed: int = 0, **options: Any,
    ) -> TunedModel:  # fmt: skip
        def prepare(model: nn.Module) -> PeftModel:
            return ADAPTERS[method](model, cfg, seed)  # `tune_weights` runs it under `seed`

        return tune_weights(method, handle, data, cfg, prepare, train_cfg=train_cfg,
                            eval_data=eval_data, run=run, seed=seed, **options)  # fmt: skip

    tune.__name__ = tune.__qualname__ = method
    tune.__doc__ = (
        f"Train the {method} adapter of the handle's model on `data` (`TextClassification` or "
        "`Instructions`); options of `tune_weights`: batch_size, head_lr, inplace."
    )
    return tune


_SMALL = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4}}
PAPERS = {
    "lora": (LoraConfig, "weight engineering", "Hu et al. 2021, arXiv 2106.09685"),
    "dora": (DoraConfig, "weight engineering", "Liu et al. 2024, arXiv 2402.09353"),
    "ia3": (IA3Config, "weight engineering", "Liu et al. 2022, arXiv 2205.05638"),
    "prompt_tuning": (PromptTuningConfig, "input engineering", "Lester et al. 2021, arXiv 2104.08691"),
    "prefix_tuning": (PrefixTuningConfig, "input engineering", "Li & Liang 2021, arXiv 2101.00190"),
}  # fmt: skip


def _register(name: str) -> Callable[..., TunedModel]:
    config, branch, paper = PAPERS[name]
    return register(
        "tuning", name, shape=TUNER, branch=branch, access=Access.WEIGHTS, config=config,
        paper=paper, example=example(config.build(_SMALL.get(name, {}))),
        cli=f"lfm tuning train --method {name}",
    )(_tuner(name))  # fmt: skip


lora = _register("lora")
dora = _register("dora")
ia3 = _register("ia3")
prompt_tuning = _register("prompt_tuning")
prefix_tuning = _register("prefix_tuning")
