"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): LoRA with a larger learning rate for B.

LoRA's update (α/r)·B·A starts from B = 0, and with one learning rate for both factors feature
learning is inefficient in wide models: the paper shows B should move faster than A,

    η_B = λ · η_A,   λ ≫ 1   (the paper's default: λ = 2⁴ = 16),

with everything else as in LoRA (the same adapter, initialisation and loss). Here A and the rest
train at the loop's `lr` and every `lora_B` matrix at `lr_ratio · lr`, one AdamW group.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from lfm.access import Access
from lfm.config import Config
from lfm.core.train import TrainConfig
from lfm.registry import register
from lfm.runs import Run
from lfm.tuning.contract import TUNER
from lfm.tuning.peft_methods import ADAPTERS, LoraConfig
from lfm.tuning.results import TunedModel
from lfm.tuning.tiny import example
from lfm.tuning.trainer import Data, train_config, tune_weights

LORA_B = r"\.lora_B\."  # PEFT's names of the B factors (`...q_proj.lora_B.default.weight`)


class LoraPlusConfig(LoraConfig):
    lr_ratio: float = Field(16.0, gt=0)  # λ = η_B / η_A (paper: 2⁴)


def lora_plus(
    handle: Any, data: Data, cfg: Config | None = None, *, train_cfg: TrainConfig | None = None,
    eval_data: Data | None = None, run: Run | None = None, seed: int = 0, **options: Any,
) -> TunedModel:  # fmt: skip
    """Train LoRA on `data` with B's learning rate `lr_ratio` times A's (options of
    `tune_weights`: batch_size, head_lr, inplace)."""
    assert isinstance(cfg, LoraPlusConfig)  # resolved by the registry's gate
    tcfg = train_config(cfg, train_cfg, seed)
    tcfg = tcfg.replace(lr_groups={**tcfg.lr_groups, LORA_B: tcfg.lr * cfg.lr_ratio})

    def prepare(model: nn.Module) -> nn.Module:
        return ADAPTERS["lora"](model, cfg, seed)

    return tune_weights("lora_plus", handle, data, cfg, prepare, train_cfg=tcfg,
                        eval_data=eval_data, run=run, seed=seed, **options)  # fmt: skip


lora_plus = register(
    "tuning", "lora_plus", shape=TUNER, branch="weight engineering", access=Access.WEIGHTS,
    config=LoraPlusConfig, paper="Hayou et al. 2024, arXiv 2402.12354",
    example=example(LoraPlusConfig()), cli="lfm tuning train --method lora_plus",
)(lora_plus)  # fmt: skip
