"""Edits as values: a `Patch` holds per-module weight deltas and can be saved, applied, reverted.

Every editing method computes a patch without changing the model; `patch.apply(model)` writes
W ← W + ΔW and returns an `Undo` holding the original tensors, so `undo.revert(model)` restores
them bit for bit (W + ΔW − ΔW is not exact in floating point). A delta is low-rank, ΔW = U Vᵀ
(ROME's rank-one update, Meng et al. 2022, arXiv 2202.05262), or dense (MEMIT, FT-L).

Deltas are stored in `nn.Linear` orientation, (out, in). GPT-2's `Conv1D` stores its weight as
(in, out); the orientation is decided by the module's type, never by its shape (a square
projection would pass a shape test either way).

A patch carries a fingerprint of the weights it was computed from (SHA-256 of the touched
tensors, with the model type and shapes) and refuses to apply to any other weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm.core.io import atomic_path, load_tensors, read_meta, save_tensors
from lfm.edit.base import edits, hash_bytes
from lfm.edit.requests import Request
from lfm.edit.site import is_conv1d
from lfm.errors import LfmError

FORMAT = "lfm-edit-patch/1"
UNDO_FORMAT = "lfm-edit-undo/1"


@dataclass(frozen=True)
class Delta:
    """ΔW of one module's weight, (out, in): `u @ v.T` when low-rank, else `dense`."""

    module: str
    u: torch.Tensor | None = None  # (out, r)
    v: torch.Tensor | None = None  # (in, r)
    dense: torch.Tensor | None = None  # (out, in)

    def matrix(self, device: torch.device | None = None) -> torch.Tensor:
        """ΔW in the patch's dtype, on `device` (None: where the patch's tensors are): a low-rank
        delta's factors are moved there and multiplied there."""
        if self.dense is not None:
            return self.dense if device is None else self.dense.to(device)
        if self.u is None or self.v is None:
            raise LfmError(f"delta for {self.module} has neither factors nor a dense matrix")
        if device is None:
            return self.u @ self.v.T
        return self.u.to(device) @ self.v.to(device).T

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = {"u": self.u, "v": self.v, "dense": self.dense}
        return {f"{self.module}::{k}": t.contiguous() for k, t in parts.items() if t is not None}


def resident(model: nn.Module, name: str) -> nn.Module:
    """Module `name`, whose weight is in memory: one line for one Accelerate left on disk (a
    model from `load_offloaded` keeps only the blocks an edit reads and writes)."""
    mod = model.get_submodule(name)
    if mod.weight.is_meta:
        raise LfmError(
            f"{name} is offloaded to disk (its weights are not in memory); an edit reads and "
            "writes only blocks kept in memory: load the model with those blocks kept "
            "(`lfm edit apply --offload` keeps the ones the method edits)"
        )
    return mod


def linear_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of module `name` in (out, in) orientation (a view, not a copy)."""
    mod = resident(model, name)
    return mod.weight.T if is_conv1d(mod) else mod.weight


def fingerprint(model: nn.Module, modules: Sequence[str]) -> str:
    """SHA-256 of the model type and the named modules' weights (shape, dtype, bytes)."""
    return fingerprint_of(
        model_type(model), modules, lambda name: resident(model, name).weight.detach()
    )


def fingerprint_of(kind: str, modules: Sequence[str], weight: Callable[[str], torch.Tensor]) -> str:
    """`fingerprint` from the model type `kind` and each module's weight as `weight(name)` gives
    it (one at a time: a model on disk is hashed without being loaded)."""
    h = hashlib.sha256(kind.encode())
    for name in sorted(modules):
        w = weight(name)
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        hash_bytes(h, w)
    return h.hexdigest()


def model_type(model: nn.Module) -> str:
    """The model type a fingerprint starts from: the config's `model_type`, else the class."""
    return str(getattr(model.config, "model_type", type(model).__name__))


def check_module(model: nn.Module, module: str, base: str, where: str, what: str) -> None:
    """One-line `LfmError` unless `model` has `module` (`where`: how the patch sits there) and
    its weights there have the fingerprint `base` (`what`: the patch's name in the message)."""
    try:
        model.get_submodule(module)
    except AttributeError:
        raise LfmError(f"{where} {module}, which this model lacks") from None
    if fingerprint(model, [module]) != base:
        raise LfmError(f"{what} was made for other weights (base {base[:12]})")


@dataclass
class Undo:
    """The original tensors a patch replaced; `revert` writes them back exactly."""

    originals: dict[str, torch.Tensor]

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        with edits(model):
            for name, w in self.originals.items():
                model.get_submodule(name).weight.copy_(w)


@dataclass
class Patch:
    """Weight deltas, the requests they implement, and where they came from."""

    deltas: list[Delta]
    requests: list[Request]
    method: str
    config: dict[str, Any]
    base: str  # fingerprint of the weights the deltas were computed from
    info: dict[str, Any] = field(default_factory=dict)  # model type, shapes, timings

    @property
    def modules(self) -> list[str]:
        return [d.module for d in self.deltas]

    def check(self, model: nn.Module) -> None:
        """Raise a one-line `LfmError` unless `model` holds the weights this patch was made for."""
        missing = [m for m in self.modules if not _has(model, m)]
        if missing:
            raise self.lacking(missing[0])
        self.check_base(fingerprint(model, self.modules))

    def lacking(self, module: str) -> LfmError:
        """The one-line error for a model without `module`, which this patch edits."""
        return LfmError(f"patch ({self.method}) edits {module}, which this model lacks")

    def check_base(self, base: str) -> None:
        """One-line `LfmError` unless `base`, the fingerprint of the weights at hand, is the one
        this patch was made from."""
        if base != self.base:
            raise LfmError(
                f"patch ({self.method}) was made for other weights (base {self.base[:12]}); "
                "refusing to apply it to this model (a patch fits the weights it was made from, "
                "loaded in the same dtype: --dtype)"
            )

    @torch.no_grad()
    def apply(self, model: nn.Module) -> Undo:
        """W ← W + ΔW in place; returns the `Undo` that restores the originals bit for bit.

        ΔW is formed on the weight's device in the patch's dtype, then cast to the weight's dtype
        and added; the originals are copies of the weights as they were (their device, dtype)."""
        self.check(model)
        undo = Undo({m: model.get_submodule(m).weight.detach().clone() for m in self.modules})
        with edits(model):  # the statistics stay those of the base model
            for d in self.deltas:
                w = linear_weight(model, d.module)
                w.add_(d.matrix(w.device).to(w.dtype))
        return undo

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (deltas + JSON metadata, tagged `FORMAT`), atomically."""
        tensors = {k: v for d in self.deltas for k, v in d.tensors().items()}
        return save_tensors(
            path, tensors, FORMAT, method=self.method, base=self.base, config=self.config,
            requests=[r.to_dict() for r in self.requests], modules=self.modules, info=self.info,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read a patch written by `save` (also one written before `lfm.core.io` wrote it)."""
        tensors, meta = load_tensors(path, FORMAT)
        deltas = [_delta(m, tensors) for m in meta["modules"]]
        reqs = [Request.from_dict(r) for r in meta["requests"]]
        return cls(
            deltas, reqs, str(meta["method"]), meta["config"], str(meta["base"]), meta["info"]
        )


def _delta(module: str, tensors: dict[str, torch.Tensor]) -> Delta:
    get = tensors.get
    return Delta(module, get(f"{module}::u"), get(f"{module}::v"), get(f"{module}::dense"))


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def make_patch(
    model: nn.Module, deltas: list[Delta], requests: Sequence[Request], method: str, cfg: Any
) -> Patch:
    """A patch for `deltas` computed from the current weights of `model`."""
    modules = [d.module for d in deltas]
    info = {
        "model_type": model_type(model),
        "shapes": {m: list(model.get_submodule(m).weight.shape) for m in modules},
    }
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return Patch(list(deltas), list(requests), method, cfg_dict, fingerprint(model, modules), info)


UNDO_FILE = "edit-undo.safetensors"


def save_edited(handle: Any, undo: Undo, out: str | Path) -> Path:
    """Write an edited `LocalModel` as a Hugging Face folder, with the originals for `revert`."""
    with atomic_path(out) as tmp:
        handle.model.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)
        save_tensors(tmp / UNDO_FILE, undo.originals, UNDO_FORMAT)
    return Path(out)


def load_originals(path: str | Path) -> dict[str, torch.Tensor]:
    """The original tensors of an edited folder's undo file (tagged `UNDO_FORMAT`, or untagged:
    written before the tag)."""
    if read_meta(path).get("format") is None:
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_tensors(path, UNDO_FORMAT)[0]


def revert_folder(folder: str | Path, out: str | Path) -> Path:
    """Load a folder written by `save_edited`, restore its original weights, write it to `out`.

    The folder loads in the dtype of its originals (float32, bfloat16 or float16: the dtype
    `patch_apply` loaded the model in, `--dtype`), whatever the process default, so every weight
    is written back in that dtype, the restored ones bit for bit. No forward pass runs: the
    weights are read, copied over and written (on the process default device)."""
    from lfm.assets import load_model
    from lfm.core.placement import MIXED

    undo_path = Path(folder) / UNDO_FILE
    if not undo_path.exists():
        raise LfmError(f"{folder} has no {UNDO_FILE}; it was not written by `lfm edit patch-apply`")
    originals = load_originals(undo_path)
    dtypes = {t.dtype for t in originals.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    # a dtype `load_model` knows; else (none, several, float64) the process default, as before
    name = str(dtype).removeprefix("torch.") if dtype in MIXED else None
    handle = load_model(str(folder), dtype=name)
    Undo(originals).revert(handle.model)
    with atomic_path(out) as tmp:
        handle.model.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)
    return Path(out)
