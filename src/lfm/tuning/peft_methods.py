"""Adapters and soft prompts through PEFT, with its silent traps closed.

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
  sampled from its vocabulary, so at step 0 the model reads those n tokens before its input.

What PEFT lets pass and we refuse: a `target_modules` entry that matches no module (PEFT accepts it
when another entry matches), and saving an adapter with no tensors in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft.utils import constants as C
from pydantic import Field
from safetensors import safe_open
from torch import nn

from lfm.access import Access
from lfm.config import Config
from lfm.errors import ConfigError, LfmError
from lfm.registry import register

ADAPTER_FILE = "adapter_model.safetensors"


class LoraCfg(Config):
    r: int = Field(8, ge=1)  # rank of B·A (paper: 4-8 suffice on GPT-3)
    alpha: float = Field(16.0, gt=0)  # scale α; the update is multiplied by α/r
    dropout: float = Field(0.05, ge=0, lt=1)  # dropout on the adapter's input
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default per architecture (q, v)
    lr: float = Field(2e-4, gt=0)  # AdamW learning rate (paper: 2e-4 for GPT-2)

    def to_peft(self, task: TaskType | None) -> PeftConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type=task,
            target_modules=list(self.target_modules) if self.target_modules else None,
        )  # fmt: skip


class DoraCfg(LoraCfg):
    def to_peft(self, task: TaskType | None) -> PeftConfig:
        cfg = super().to_peft(task)
        cfg.use_dora = True
        return cfg


class IA3Cfg(Config):
    target_modules: tuple[str, ...] | None = None  # None: keys, values, feed-forward (paper)
    feedforward_modules: tuple[str, ...] | None = None  # scaled on their input; None: default
    lr: float = Field(3e-3, gt=0)  # AdamW learning rate (T-Few paper: 3e-3)

    def to_peft(self, task: TaskType | None) -> PeftConfig:
        opt = {k: list(v) for k, v in self._targets().items() if v}
        return IA3Config(task_type=task, **opt)

    def _targets(self) -> dict[str, tuple[str, ...] | None]:
        return {
            "target_modules": self.target_modules,
            "feedforward_modules": self.feedforward_modules,
        }


class PromptTuningCfg(Config):
    num_virtual_tokens: int = Field(20, ge=1)  # prompt length (paper: 20-100; 100 at its best)
    init: Literal["sample_vocab", "random"] = "sample_vocab"  # paper: sampled vocabulary
    lr: float = Field(3e-2, gt=0)  # paper: 0.3 with Adafactor; 3e-2 with AdamW here

    def to_peft(self, task: TaskType | None) -> PeftConfig:
        init = (
            PromptTuningInit.SAMPLE_VOCAB
            if self.init == "sample_vocab"
            else PromptTuningInit.RANDOM
        )
        return PromptTuningConfig(
            task_type=task, num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init=init
        )


class PrefixTuningCfg(Config):
    num_virtual_tokens: int = Field(10, ge=1)  # prefix length (paper: 10 for table-to-text)
    projection: bool = False  # the paper's MLP reparameterisation (PEFT's prefix_projection)
    # "words": keys/values of sampled tokens (paper 7.2; a causal LM's cache, so encoders keep
    # PEFT's init); "random": PEFT's N(0, 1)
    init: Literal["words", "random"] = "words"
    lr: float = Field(1e-2, gt=0)  # paper: 5e-5 with the MLP; larger without it

    def to_peft(self, task: TaskType | None) -> PeftConfig:
        if self.projection and self.init == "words":
            raise ConfigError(
                "prefix init='words' sets the keys and values directly; with projection=True "
                "set init='random'"
            )
        return PrefixTuningConfig(
            task_type=task, num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.projection,
        )  # fmt: skip


@torch.no_grad()
def prefix_from_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values of `ids` (n,) in `model`, flattened as PEFT stores a prefix.

    Returns:
        (n, layers·2·heads·head_dim): per token, layer by layer, its key then its value.
    """
    was = model.training
    cache = model.eval()(input_ids=ids[None], use_cache=True).past_key_values
    model.train(was)
    kv = torch.stack(
        [torch.stack([c.keys[0], c.values[0]]) for c in cache.layers]
    )  # (L, 2, H, n, D)
    return kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)


def _prefix_init(model: nn.Module, cfg: PeftCfg) -> torch.Tensor | None:
    """The flattened keys and values of `num_virtual_tokens` tokens sampled from the vocabulary
    (global RNG), or None where the config keeps PEFT's init."""
    words = isinstance(cfg, PrefixTuningCfg) and cfg.init == "words" and _is_causal(model)
    if not words:
        return None
    ids = torch.randint(0, model.config.vocab_size, (cfg.num_virtual_tokens,))  # type: ignore[union-attr]
    return prefix_from_tokens(model, ids.to(model.device))


PeftCfg = LoraCfg | IA3Cfg | PromptTuningCfg | PrefixTuningCfg


def _is_causal(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def default_targets(model: nn.Module, mapping: dict, what: str) -> tuple[str, ...]:
    """PEFT's default target names for `model`'s architecture; a clear error if it has none."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in mapping:
        raise ConfigError(f"no default {what} targets for model type {kind!r}; set target_modules")
    return tuple(mapping[kind])


def check_targets(model: nn.Module, entries: tuple[str, ...] | list[str]) -> None:
    """Raise `ConfigError` naming every entry that matches no module (PEFT's suffix rule)."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [e for e in entries if not any(n == e or n.endswith(f".{e}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(
            f"target_modules {', '.join(map(repr, missing))} match no module of "
            f"{type(model).__name__}; its module names end in: {', '.join(leaves[:20])}"
        )


def _resolved_targets(model: nn.Module, cfg: PeftCfg) -> list[tuple[str, ...]]:
    """The target lists a config will use on `model` (defaults filled in)."""
    if isinstance(cfg, LoraCfg):
        mapping = C.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        return [cfg.target_modules or default_targets(model, mapping, "LoRA")]
    if isinstance(cfg, IA3Cfg):
        tm = cfg.target_modules or default_targets(
            model, C.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, "IA3"
        )
        ff = cfg.feedforward_modules or default_targets(
            model, C.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, "IA3"
        )
        return [tm, ff]
    return []


def inject(model: nn.Module, cfg: PeftCfg) -> PeftModel:
    """Wrap `model` in a PEFT model for `cfg`, after checking every target module exists.

    Args:
        model: a causal LM (`...ForCausalLM`) or an encoder (`BertModel`-like).
        cfg: one of the adapter or soft-prompt configs above.
    """
    for entries in _resolved_targets(model, cfg):
        check_targets(model, entries)
    task = TaskType.CAUSAL_LM if _is_causal(model) else TaskType.FEATURE_EXTRACTION
    peft_cfg, prefix = cfg.to_peft(task), _prefix_init(model, cfg)
    peft = get_peft_model(model, peft_cfg)
    if prefix is not None:
        peft.prompt_encoder[peft.active_adapter].load_prompt_embeddings(prefix)
    return peft


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `model`'s adapter."""
    if not isinstance(model, PeftModel):
        raise LfmError(
            f"{type(model).__name__} holds no PEFT adapter; save it with save_pretrained"
        )
    return get_peft_model_state_dict(model)


def check_adapter_dir(path: str | Path) -> int:
    """Raise `LfmError` if the adapter saved at `path` has no tensors; return how many it has."""
    file = Path(path) / ADAPTER_FILE
    if not file.exists():
        raise LfmError(f"no {ADAPTER_FILE} in {path}: the adapter was not saved")
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
        empty = not keys or any(f.get_slice(k).get_shape() in ([], [0]) for k in keys)
    if empty:
        raise LfmError(
            f"the adapter saved in {path} is empty; check target_modules and the adapter name"
        )
    return len(keys)


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Save a PEFT adapter in PEFT's format (`PeftModel.from_pretrained` loads it), non-empty."""
    state = adapter_state(model)
    if not state or any(t.numel() == 0 for t in state.values()):
        raise LfmError("refusing to save an empty adapter: the model has no adapter tensors")
    model.save_pretrained(str(path))
    if check_adapter_dir(path) != len(state):
        raise LfmError(f"the adapter saved in {path} lacks some of its {len(state)} tensors")
    return Path(path)


def _smoke(cfg: Config, seed: int) -> torch.Tensor:
    from lfm.tuning.trainer import smoke_tune

    return smoke_tune(cfg, seed)


PAPERS = {
    "lora": (LoraCfg, "weight engineering", "Hu et al. 2021, arXiv 2106.09685"),
    "dora": (DoraCfg, "weight engineering", "Liu et al. 2024, arXiv 2402.09353"),
    "ia3": (IA3Cfg, "weight engineering", "Liu et al. 2022, arXiv 2205.05638"),
    "prompt-tuning": (PromptTuningCfg, "input engineering", "Lester et al. 2021, arXiv 2104.08691"),
    "prefix-tuning": (PrefixTuningCfg, "input engineering", "Li & Liang 2021, arXiv 2101.00190"),
}

for _name, (_cfg, _branch, _paper) in PAPERS.items():
    register(
        "tuning",
        _name,
        branch=_branch,
        access=Access.WEIGHTS,
        config=_cfg,
        paper=_paper,
        smoke=_smoke,
    )(inject)
