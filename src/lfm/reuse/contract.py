"""The callable shapes of model reuse.

- `Kernel`: one tensor of the merged model from the base's and the models' tensors,
  `(base, tensors, weights, cfg, ctx) -> Tensor`. `run("reuse/ties", models, base=...)` maps it
  over every parameter name with the one driver (`driver.py`) and returns the merged state dict;
  the models are white-box handles, modules, state dicts or weight files (WEIGHTS).
- `Ensemble`: `(handles, inputs, cfg) -> outputs`, combining what several handles answer at the
  method's level (log-probabilities for SCORES, labels or texts for TEXT).
- `Aligner`: `(models, cfg) -> list of state dicts`, one per model: the first as given, every
  other re-expressed in its coordinates (Git Re-Basin's permutations), ready to be merged.
- `Upscaler`: `(model, models, base, data, cfg) -> result` with the merged model in
  `result.model`: some modules of `model`'s architecture become mixtures of the experts whose
  routers are trained on unlabelled `data` (WEMoE); the models and the base are white-box handles,
  modules or state dicts (WEIGHTS).
- `Upcycler`: `(base, experts, prompts, cfg) -> handle`: a sparse mixture of experts built from a
  base and fine-tuned copies of it, each expert's router row set from its prompts (`moe.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from lfm.access import state_dict_of
from lfm.registry import MethodSpec, shape
from lfm.reuse.driver import Ctx, DictReader, OnMissing, Reader, plan, run_merge


class Kernel(Protocol):
    def __call__(
        self, base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
    ) -> Tensor: ...


class Ensemble(Protocol):
    def __call__(self, handles: Sequence[Any], inputs: Any, cfg: Any = None) -> Any: ...


class Aligner(Protocol):
    def __call__(self, models: Sequence[Any], cfg: Any = None) -> list[dict[str, Tensor]]: ...


class Upcycler(Protocol):
    def __call__(
        self, base: Any, experts: Sequence[Any], prompts: Sequence[Sequence[str]], cfg: Any = None
    ) -> Any: ...


class Upscaler(Protocol):
    def __call__(
        self, model: Any, models: Sequence[Any], base: Any, data: Sequence[Any], cfg: Any = None
    ) -> Any: ...


def reader_of(model: Any, base: Any = None) -> Reader:
    """A tensor reader over a white-box handle, module, state dict or weights on disk.

    Weights on disk are read lazily, tensor by tensor (a LoRA adapter folder reads as the model
    it makes of `base`, when `base` is on disk too).
    """
    if isinstance(model, str | Path):
        from lfm.reuse.engine import open_model

        on_disk = base if isinstance(base, str | Path) else None
        return open_model(model, on_disk, reader_of(on_disk) if on_disk is not None else None)
    return DictReader(state_dict_of(model, "a merge"))


def merge(
    spec: MethodSpec,
    models: Sequence[Any],
    *,
    base: Any = None,
    weights: Sequence[float] | None = None,
    cfg: Any = None,
    on_missing: OnMissing = "error",
    stats: Mapping[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Merge `models` (onto `base`) with the kernel of `spec`, in memory; the merged state dict.

    Args:
        spec: the merge method's registry entry.
        models: white-box handles, modules, state dicts or weight files (WEIGHTS access).
        base: the base model, for the methods that need one.
        weights: one weight per model (default 1.0 each).
        cfg: the method's config (resolved by `run`).
        on_missing: "error", or "skip": merge a tensor over the models that have it.
        stats: statistics held in memory for data-aware kernels (`ctx.stats`).
    """
    base_reader = reader_of(base) if base is not None else None
    inputs = plan(base_reader, [reader_of(m, base) for m in models], on_missing)
    out: dict[str, Tensor] = {}
    run_merge(spec, inputs, cfg, out.__setitem__, weights, stats=stats)
    return out


def _kernel_handles(arguments: Mapping[str, Any]) -> list[Any]:
    return [*arguments.get("models", ()), arguments.get("base")]


KERNEL = shape("reuse", "kernel", Kernel, handles=_kernel_handles, call=merge)
ENSEMBLE = shape("reuse", "ensemble", Ensemble, handles="handles")
ALIGNER = shape("reuse", "aligner", Aligner, handles="models")


def _upcycler_handles(arguments: Mapping[str, Any]) -> list[Any]:
    return [arguments.get("base"), *arguments.get("experts", ())]


UPCYCLER = shape("reuse", "upcycler", Upcycler, handles=_upcycler_handles)
MOE = shape("reuse", "moe", Upscaler, handles=_kernel_handles)
