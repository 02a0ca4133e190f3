"""LoRA adapters (PEFT format) as merge inputs: an adapter on top of a base model reads as a model.

LoRA (Hu et al. 2021, arXiv 2106.09685) fine-tunes W₀ ∈ R^{out×in} as W = W₀ + ΔW with

    ΔW = s · B A,   B ∈ R^{out×r}, A ∈ R^{r×in},   s = α / r   (rsLoRA: α / √r)

so an adapter is a task vector τ = ΔW on the weights it targets and zero elsewhere. `LoraReader`
gives W₀ + ΔW for every tensor of the base, lazily, so every merge method (task arithmetic, TIES,
DARE, ...) takes adapters unchanged. GPT-2's `Conv1D` stores W as (in, out): ΔW is transposed when
the adapter says `fan_in_fan_out` or the base is a GPT-2 model (PEFT's own rule for Conv1D).

A model entry is an adapter when its folder holds `adapter_config.json`; mergekit's `base+adapter`
form is read too. The adapter sits on the merge's base model, else on the base it names (a folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lfm.reuse.driver import MergeError, Reader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CONV1D_MODEL_TYPES = {"gpt2"}  # base architectures whose targeted projections are Conv1D (in, out)
UNSUPPORTED = ("use_dora", "lora_bias")  # adapter options that are not a plain B·A delta


def is_adapter(path: str | Path) -> bool:
    """True for a PEFT adapter folder (it holds `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def split_plus(path: str | Path) -> tuple[str, str] | None:
    """mergekit's `base+adapter` model string as (base, adapter), or None."""
    s = str(path)
    if Path(s).exists() or "+" not in s:
        return None
    base, _, adapter = s.rpartition("+")
    return (base, adapter) if is_adapter(adapter) else None


def lora_scale(cfg: dict[str, Any], module: str, rank: int) -> float:
    """s = α / r (or α / √r with rsLoRA), with PEFT's per-module `alpha_pattern` overrides."""
    alpha = float(cfg.get("lora_alpha", 8))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = float(value)
    return alpha / (rank**0.5 if cfg.get("use_rslora") else rank)


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The adapter's config and, per targeted weight name, its (lora_A, lora_B) keys."""
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or any(cfg.get(k) for k in UNSUPPORTED):
        raise MergeError(f"{folder}: only plain LoRA adapters can be merged (no DoRA, LoRA bias)")
    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
        keys = list(f.keys())
    pairs: dict[str, tuple[str, str]] = {}
    for key in keys:
        m = re.fullmatch(r"(.+)\.lora_A(?:\.[^.]+)?\.weight", key)
        if m:
            pairs[m.group(1).removeprefix(PEFT_PREFIX) + ".weight"] = (
                key, key.replace(".lora_A", ".lora_B"))  # fmt: skip
        elif ".lora_B" not in key:
            raise MergeError(f"{folder}: adapter tensor {key} is not a LoRA A/B matrix")
    return cfg, pairs


class LoraReader:
    """A `Reader` over base + (α/r)·B·A: the model a PEFT adapter makes of its base.

    Args:
        base: the reader of the base model the adapter was trained on.
        adapter: the adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
        model_type: the base's `config.json` model_type (GPT-2 weights are Conv1D, (in, out)).
    """

    def __init__(self, base: Reader, adapter: str | Path, model_type: str | None = None):
        self.base, self.path = base, Path(adapter)
        self.tied = base.tied
        self.cfg, self.pairs = read_adapter(self.path)
        self.transpose = bool(self.cfg.get("fan_in_fan_out")) or model_type in CONV1D_MODEL_TYPES
        missing = sorted(set(self.pairs) - set(base.keys()))
        if missing:
            raise MergeError(f"{self.path}: adapter targets weights the base lacks: {missing[:3]}")

    @property
    def concurrent(self) -> bool:
        """Safe to read from several threads where its base is (the adapter is opened per read)."""
        return bool(getattr(self.base, "concurrent", False))

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> Tensor:
        w = self.base.get(name)
        if name not in self.pairs:
            return w
        return (w.float() + self.delta(name, tuple(w.shape))).to(w.dtype)

    def delta(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """ΔW = s · B A in the base weight's orientation."""
        key_a, key_b = self.pairs[name]
        with safe_open(str(self.path / ADAPTER_FILE), framework="pt") as f:
            a, b = f.get_tensor(key_a).float(), f.get_tensor(key_b).float()  # (r, in), (out, r)
        d = lora_scale(self.cfg, name.removesuffix(".weight"), a.shape[0]) * (b @ a)  # (out, in)
        d = d.T if self.transpose else d
        if tuple(d.shape) != shape:
            raise MergeError(
                f"{self.path}: LoRA delta of {name} is {list(d.shape)}, weight {list(shape)}"
            )
        return d


def adapter_base(adapter: str | Path) -> str | None:
    """The base the adapter's config names, when that is a local folder."""
    name = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return name if name and Path(name).is_dir() else None


def model_type(path: str | Path) -> str | None:
    """`model_type` from a model folder's config.json (None for files or folders without one)."""
    cfg = Path(path) / "config.json"
    return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
