"""PEFT adapters and soft prompts with PEFT's silent traps closed.

What PEFT lets pass and this module refuses: a `target_modules` entry that matches no module
(PEFT accepts it when another entry matches; `check_targets` runs before `inject`), saving an
adapter with no tensors in it (`save_adapter`), and generating from a prefix-tuned model without
its prefix (`keep_prefix_in_generate`). `inject` draws the adapter's initial values from
the global random state, as PEFT does; the tuners call it under their own seed
(`lfm.core.seeding.seeded`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import (
    PeftConfig,
    PeftModel,
    PeftType,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
)
from safetensors import safe_open
from torch import nn

from lfm.errors import ConfigError, LfmError

ADAPTER_FILE = "adapter_model.safetensors"


def is_causal(model: nn.Module) -> bool:
    """Whether `model` is a causal LM (it has an output embedding), not an encoder."""
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def task_type(model: nn.Module) -> TaskType:
    return TaskType.CAUSAL_LM if is_causal(model) else TaskType.FEATURE_EXTRACTION


def default_targets(model: nn.Module, mapping: dict, what: str) -> tuple[str, ...]:
    """PEFT's default target names for `model`'s architecture; a clear error if it has none."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in mapping:
        raise ConfigError(f"no default {what} targets for model type {kind!r}; set target_modules")
    return tuple(mapping[kind])


def check_targets(model: nn.Module, entries: Sequence[str]) -> None:
    """Raise `ConfigError` naming every entry that matches no module (PEFT's suffix rule)."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [e for e in entries if not any(n == e or n.endswith(f".{e}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(
            f"target_modules {', '.join(map(repr, missing))} match no module of "
            f"{type(model).__name__}; its module names end in: {', '.join(leaves[:20])}"
        )


@torch.no_grad()
def prefix_from_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values of `ids` (n,) in `model`, flattened as PEFT stores a prefix.

    Returns:
        (n, layers·2·heads·head_dim): per token, layer by layer, its key then its value.
    """
    was = model.training
    cache = model.eval()(input_ids=ids[None], use_cache=True).cache
    model.train(was)
    kv = torch.stack(
        [torch.stack([c.keys[0], c.values[0]]) for c in cache.layers]
    )  # (L, 2, H, n, D)
    return kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)


def inject(model: nn.Module, peft_cfg: PeftConfig, prefix: torch.Tensor | None = None) -> PeftModel:
    """Wrap `model` in a PEFT model for `peft_cfg` (check its targets first: `check_targets`).

    Args:
        model: a causal LM (`...ForCausalLM`) or an encoder (`BertModel`-like); PEFT changes it
            in place.
        peft_cfg: PEFT's config of the adapter or soft prompt.
        prefix: initial keys and values of a prefix (`prefix_from_tokens`), or None for PEFT's.
    """
    try:
        peft = get_peft_model(model, peft_cfg)
    except ValueError as e:  # PEFT's checks of its own config (targets, sizes)
        raise ConfigError(f"PEFT refused the {type(peft_cfg).__name__}: {e}") from None
    if prefix is not None:
        peft.prompt_encoder[peft.active_adapter].load_prompt_embeddings(prefix)
    return keep_prefix_in_generate(peft)


def keep_prefix_in_generate(peft: PeftModel) -> PeftModel:
    """`peft`, whose `generate` reads its prefix if it is prefix-tuned (else `peft` unchanged).

    PEFT hands the prefix's keys and values to the model as `past_key_values`; transformers 5
    passes its own, still empty, `cache` beside it and the model reads `cache`, so `generate`
    ran without the prefix (the base model's tokens) while a forward pass used it. The first
    step of a generation (the model's cache still empty) now gets the prefix as its `cache`.
    """
    if peft.peft_config[peft.active_adapter].peft_type != PeftType.PREFIX_TUNING:
        return peft
    if not hasattr(peft, "prepare_inputs_for_generation"):  # an encoder: nothing to generate
        return peft
    prepare = peft.prepare_inputs_for_generation

    @functools.wraps(prepare)  # transformers reads the signature to check generate's arguments
    def with_prefix(*args, **kwargs):  # type: ignore[no-untyped-def]
        inputs = prepare(*args, **kwargs)
        prefix, cache = inputs.get("past_key_values"), inputs.get("cache")
        if prefix is not None and cache is not None and cache.get_seq_length() == 0:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    peft.prepare_inputs_for_generation = with_prefix  # type: ignore[method-assign]
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
