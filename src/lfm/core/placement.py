"""Where a model runs and in which precision: `--device` and `--dtype`, for the CLI and the API.

    resolve("auto", "bfloat16")   # Placement(device=cuda, dtype=torch.bfloat16) on a GPU machine
    use("cuda", "bfloat16")       # the process default that `load_model` takes (the CLI sets it)
    with placed("cpu", "float32"): ...

A device is `cpu`, `cuda`, `cuda:N`, `mps`, or `auto` (CUDA when present, else the CPU); a
dtype is `float32`, `bfloat16` or `float16` (or `bf16`, `fp16`, `fp32`), or `auto` (bfloat16 on a
GPU that supports it, else float32). Asking for a device this machine lacks is one `LfmError`.

The dtype is the precision of a model's weights for inference, editing and merging; the numerics
that need more stay wider whatever it is (edit statistics and solves in float64, merge arithmetic
and Grams in float32 or float64). A chosen dtype is also the training loops' autocast precision
(`mixed_precision` of Accelerate); a training command (`training=True`) loads its models in
float32, the master weights, and only autocasts. A chosen device of `cpu` keeps training on the
CPU (`TrainConfig.cpu`); a `TrainConfig` that asks for either itself wins. Unchosen, models load
on the CPU in float32 and training uses an accelerator when present, without autocast.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from lfm.core import shards
from lfm.errors import LfmError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
# dtype -> Accelerate's `mixed_precision` for training
Mixed = Literal["no", "fp16", "bf16"]
MIXED: dict[torch.dtype, Mixed] = {
    torch.float32: "no",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


@dataclass(frozen=True)
class Spread:
    """A model spread over devices by transformers and Accelerate (`from_pretrained`'s
    `device_map`, `max_memory`, `offload_folder`), for models larger than one device."""

    device_map: str | dict[str, Any]  # "auto", "balanced", "sequential", or module -> device
    max_memory: dict[Any, Any] | None = None  # device -> budget ({0: "20GiB", "cpu": "60GiB"})
    offload_folder: str | None = None  # for weights that must be copied to disk to offload


def parse_max_memory(text: str) -> dict[Any, Any]:
    """`--max-memory "0=20GiB,cpu=60GiB"` as `from_pretrained`'s `max_memory`: a GPU index or
    `cpu` (or `mps`) each with a size ("20GiB", "500MB", or bytes)."""
    out: dict[Any, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, size = (x.strip() for x in part.partition("="))
        if not eq or not key or not size:
            raise LfmError(
                f"--max-memory entry {part!r} is not DEVICE=SIZE (e.g. 0=20GiB,cpu=60GiB)"
            )
        if not key.isdigit() and key.lower() not in ("cpu", "mps"):
            raise LfmError(f"--max-memory device {key!r}: use a GPU index, cpu or mps")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, re.IGNORECASE):
            raise LfmError(f"--max-memory size {size!r}: use bytes or a size such as 20GiB")
        out[int(key) if key.isdigit() else key.lower()] = int(size) if size.isdigit() else size
    if not out:
        raise LfmError("--max-memory is empty; give DEVICE=SIZE entries (e.g. 0=20GiB,cpu=60GiB)")
    return out


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # the weights' dtype `load_model` gives
    device_chosen: bool = False  # given by `use`/`placed` (the CLI), not the library's default
    autocast: torch.dtype | None = None  # the training loops' autocast, when one was chosen
    spread: Spread | None = None  # a device map instead of one device (`load_model`)

    @property
    def cpu(self) -> bool:
        """Whether training should stay on the CPU (Accelerate's `cpu=`)."""
        return self.device.type == "cpu"

    @property
    def mixed_precision(self) -> Mixed:
        """The autocast precision a training loop should use (Accelerate's name for it)."""
        return MIXED[self.autocast or torch.float32]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A device by name; `auto` is CUDA when present; a device this machine lacks is an error."""
    if isinstance(name, torch.device):
        return name
    text = (name or "cpu").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise LfmError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LfmError(f"--device {name}: this machine has no CUDA device; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise LfmError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0..{n - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LfmError(f"--device {name}: this machine has no MPS device; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise LfmError(f"unsupported device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A floating dtype by name; `auto` is bfloat16 on a GPU that supports it, else float32."""
    if isinstance(name, torch.dtype):
        if name not in MIXED:
            raise LfmError(f"unsupported dtype {name}; use float32, bfloat16 or float16")
        return name
    text = (name or "float32").strip().lower()
    if text == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if text not in DTYPES:
        raise LfmError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto")
    return DTYPES[text]


def resolve(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Placement:
    """A placement from names; None takes the process default's part (`use`)."""
    d = resolve_device(device) if device is not None else _default.device
    t = resolve_dtype(dtype, d) if dtype is not None else _default.dtype
    return replace(_default, device=d, dtype=t)


def _chosen(
    device: str | torch.device | None, dtype: str | torch.dtype | None, training: bool
) -> Placement:
    at = resolve(device, dtype)
    at = replace(at, device_chosen=at.device_chosen or device is not None)
    if dtype is not None:  # the loops autocast to it; a training command keeps float32 weights
        at = replace(at, autocast=at.dtype, dtype=torch.float32 if training else at.dtype)
    return at


_default = Placement(torch.device("cpu"), torch.float32)


def current() -> Placement:
    """The process default placement (CPU and float32 unless `use` set another)."""
    return _default


def use(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    training: bool = False,
) -> None:
    """Set the process default placement (what `--device` and `--dtype` do); None keeps that
    part as it is. Training loops follow what was set (`lfm.core.train`: a chosen `cpu` keeps
    them on the CPU; a chosen dtype is their autocast), where otherwise they use an accelerator
    when present, in float32. `training`: the dtype is only the autocast, and models load in
    float32 (the master weights a training command keeps)."""
    global _default
    _default = _chosen(device, dtype, training)


@contextmanager
def placed(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    training: bool = False,
) -> Iterator[Placement]:
    """The default placement within a block (as `use` sets it), restored after it."""
    global _default
    before = _default
    _default = _chosen(device, dtype, training)
    try:
        yield _default
    finally:
        _default = before


def device_of(model: torch.nn.Module) -> torch.device:
    """Where `model` takes its inputs: for a model spread by a `device_map` (`load_model`), the
    device its input embeddings run on; else where its parameters are (the CPU if it has none)."""
    if (ex := execution_device(model)) is not None:
        return ex
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def execution_device(model: torch.nn.Module) -> torch.device | None:
    """The device the input embeddings of a model dispatched by Accelerate (a `device_map`) run
    on, whatever device their weights wait on (disk-offloaded weights wait on "meta"); None
    for a model that was not dispatched."""
    if getattr(model, "hf_device_map", None) is None:
        return None
    get = getattr(model, "get_input_embeddings", None)
    hook = getattr(get() if callable(get) else None, "_hf_hook", None)
    ex = getattr(hook, "execution_device", None)
    return None if ex is None else torch.device(ex)


def parameters_anywhere(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter with its values: those in memory as they are, and those Accelerate
    offloaded (waiting on "meta") read one at a time from where its hook keeps them."""
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        stored = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
        for name, p in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if not p.is_meta:
                yield full, p
            elif stored is not None:
                yield full, stored[name]
            else:
                raise LfmError(f"{full} is on the meta device and no offload hook holds it")


class _ReadByOffset(Mapping[str, torch.Tensor]):
    """Accelerate's map of offloaded weights, with the weights it reads from a model's
    safetensors files read by `lfm.core.shards.StoredFile` (each file's header parsed once, one
    positioned read a tensor) instead of a `safe_open` of the whole file for every tensor; then
    cast and moved as Accelerate does. Everything else is the wrapped map's."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __getitem__(self, key: str) -> torch.Tensor:
        info = None if key in self.loader.state_dict else self.loader.index.get(key)
        if not isinstance(info, dict) or info.get("safetensors_file") is None:
            return self.loader[key]
        t = shards.read_tensor(info["safetensors_file"], info.get("weight_name", key))
        if "dtype" in info:
            t = t.to(getattr(torch, info["dtype"]))
        device = torch.device("cpu" if self.loader.device is None else self.loader.device)
        return t if t.device == device else t.to(device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def read_offloaded_by_offset(model: torch.nn.Module) -> int:
    """Make the Accelerate hooks of a dispatched model read the weights they keep in the model's
    safetensors files through `_ReadByOffset`; returns the number of hooks changed (0 when no
    weight waits on disk)."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    wrapped: dict[int, _ReadByOffset] = {}
    changed = 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            stored = getattr(h, "weights_map", None)
            loader = getattr(stored, "dataset", None)
            if (
                isinstance(stored, PrefixedDataset)
                and isinstance(loader, OffloadedWeightsLoader)
                and all(hasattr(loader, a) for a in ("state_dict", "index", "device"))
            ):  # else Accelerate's own reads are kept
                stored.dataset = wrapped.setdefault(id(loader), _ReadByOffset(loader))
                changed += 1
    return changed


def dispatched(model: torch.nn.Module) -> bool:
    """Whether `model` was loaded with a `device_map` that spreads it over several devices or
    leaves weights on disk (Accelerate's hooks move each part's weights and inputs)."""
    places = set((getattr(model, "hf_device_map", None) or {}).values())
    return len(places) > 1 or bool(places & {"disk", "meta"})


def loop_device(model: torch.nn.Module) -> torch.device:
    """Where a training loop of lfm's own (meta-learning, data-free meta-learning) runs: the
    chosen device (`--device`), else where `model` is (`device_of`)."""
    return _default.device if _default.device_chosen else device_of(model)


def autocast(device: torch.device) -> AbstractContextManager[object]:
    """The chosen autocast (`--dtype` of a training command) for a loop's forward passes on
    `device`; off when none was chosen or it is float32. The parameters, their gradients and the
    optimiser's state stay float32: only the matrix products run in the lower precision."""
    dtype = _default.autocast
    on = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if on else None, enabled=on)
