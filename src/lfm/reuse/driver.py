"""The one per-tensor driver behind every merge, in memory or streamed from safetensors.

A merge maps a per-tensor kernel over the parameter names of a template model (the base model,
or the first model when the method needs no base): for each name it reads that tensor from every
input, merges, and hands the result to a sink (a dict, or the shard writer of `engine.py`).
Inputs are `Reader`s, so a state dict in memory and a sharded folder on disk share this code.

Before anything is merged the driver checks every input against the template: a tensor missing
from a model, a shape that differs (for embeddings: vocabularies that differ) is a `MergeError`
naming the tensors. A missing output embedding of a model with tied embeddings is read from its
input embedding instead.

The kernel and what it needs besides tensors (a base model, how many models, a first pass over
all tensors) come from the method's registry entry (`kernel_spec`), so `merge_state_dicts`, the
streaming engine and `lfm.registry.run("reuse/<name>", models, base=...)` share one table.

`run_merge(..., device=...)` runs each tensor's kernel on a device: the tensors are read and
checked where the readers give them (the CPU), moved there (`to_device`), merged, and the result
cast to the template's dtype and moved back to the CPU before it reaches the sink. The kernels in
`CPU_KERNELS` run on the CPU whatever the device. `run_merge(..., dtype=...)` casts every floating
result to that dtype instead of the template's (the arithmetic is the kernels' own, float32 or
wider, either way); a value that overflows it is a `MergeError`.

On the CPU, `run_merge` merges up to `MERGE_WORKERS` tensors at once on threads, no more than
torch's thread count (the kernels' NumPy selections, torch's elementwise passes and the reads
release the GIL), and hands the results to the sink in template order: each tensor's floats are
its own kernel's, so the output is the same bit for bit as one at a time. Readers that are not
known to be safe to read from several threads (a GGUF file's, whose dequantising keeps state)
merge one tensor at a time, and so does a merge on an accelerator.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import torch
from torch import Tensor

from lfm import registry
from lfm.config import Config
from lfm.core import shards
from lfm.core.io import check_finite, nonfinite
from lfm.core.shards import dtype_name
from lfm.errors import LfmError
from lfm.registry import MethodSpec

OnMissing = Literal["error", "skip"]
# Output embedding -> the input embeddings it may be tied to (Llama/Gemma/Mistral, GPT-2, T5-like).
TIED_ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight"),
}
EMBEDDING_HINTS = ("embed", "wte", "lm_head", "shared.weight")
# Kernels that run on the CPU whatever `device` asks: RegMean solves in float64 with LAPACK's
# `gelsd`, which only the CPU has. (DARE's and DELLA's drop masks are drawn on the CPU from NumPy's
# seeded generator and moved to the task vectors' device; Fisher's statistics, read on the CPU, are
# moved to the weights' device: those kernels run on the device.)
CPU_KERNELS = frozenset({"regmean"})
# Tensors merged at once on the CPU (`run_merge`): two keep a 2-core machine busy while one
# tensor's selection runs single-threaded; each one in flight holds its inputs and task vectors.
MERGE_WORKERS = 2
CPU = torch.device("cpu")


class MergeError(LfmError):
    """The models cannot be merged as given."""


class MissingTensorError(MergeError):
    """A tensor of the template model is absent from another model (or the reverse)."""


class ShapeMismatchError(MergeError):
    """A tensor has different shapes in different models (e.g. different vocabularies)."""


class Reader(Protocol):
    """Lazy access to the tensors of one model."""

    tied: bool  # the model ties its output embedding to its input embedding

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> Tensor: ...


@dataclass
class DictReader:
    """A `Reader` over a state dict held in memory."""

    sd: Mapping[str, Tensor]
    tied: bool = False
    concurrent: ClassVar[bool] = True  # `get` may be called from several threads at once

    def keys(self) -> list[str]:
        return list(self.sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.sd[name].dtype

    def get(self, name: str) -> Tensor:
        return self.sd[name]


@dataclass(frozen=True)
class Ctx:
    """What a kernel may know besides the tensors: the parameter name and model-level stats."""

    name: str
    stats: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[int, ...] = ()  # the model index of each tensor given to the kernel


Prepare = Callable[["Inputs", Any], dict[str, Any]]


def kernel_spec(method: str | MethodSpec) -> MethodSpec:
    """The registry entry of a merge method (`ties` or `reuse/ties`).

    What the driver needs besides the kernel is in the entry's extras: `needs_base` (default
    True), `min_models` (1), `max_models` (None: any number), `prepare` (a pass over all
    tensors before merging that gives model-level statistics, e.g. TIES's per-model thresholds)
    and `divides_by_weight_sum` (cfg -> bool: weights summing to zero are refused).
    """
    if isinstance(method, MethodSpec):
        return method
    importlib.import_module("lfm.reuse")
    name = method.removeprefix("reuse/")
    try:
        spec = registry.get(f"reuse/{name}")
    except LfmError:
        spec = None
    if spec is None or spec.shape.name != "kernel":
        kernels = [s.name for s in registry.methods("reuse") if s.shape.name == "kernel"]
        raise MergeError(f"no merge method {method!r}; choose one of: {', '.join(kernels)}")
    return spec


@dataclass
class Inputs:
    """The readers of one merge and the source name of each output tensor in each model."""

    base: Reader | None
    models: list[Reader]
    names: list[str] = field(default_factory=list)  # output names, in template order
    sources: dict[str, list[str | None]] = field(default_factory=dict)  # name -> per-model key

    @property
    def template(self) -> Reader:
        return self.base if self.base is not None else self.models[0]

    def tensors(self, name: str) -> tuple[Tensor | None, list[Tensor], list[int]]:
        """Base tensor, the models' tensors and their model indices (models lacking it skipped)."""
        base = self.base.get(name) if self.base is not None else None
        idx = [i for i, key in enumerate(self.sources[name]) if key is not None]
        return base, [self.models[i].get(self.sources[name][i]) for i in idx], idx  # type: ignore[arg-type]


def _source_key(reader: Reader, keys: set[str], name: str) -> str | None:
    if name in keys:
        return name
    if reader.tied:
        return next((a for a in TIED_ALIASES.get(name, ()) if a in keys), None)
    return None


def plan(
    base: Reader | None,
    models: Sequence[Reader],
    on_missing: OnMissing = "error",
    found: list[str] | None = None,
) -> Inputs:
    """Check every model against the template and map each output name to its source keys.

    `found`: a list that receives every problem, one line each, instead of the first kind of
    problem being raised (`lfm.reuse.plan.check_plan` reports them all at once)."""
    inputs = Inputs(base, list(models))
    tmpl = inputs.template
    inputs.names = tmpl.keys()
    problems: list[str] = []
    for i, reader in enumerate(models):
        keys = set(reader.keys())
        for name in inputs.names:
            inputs.sources.setdefault(name, []).append(_source_key(reader, keys, name))
        missing = [n for n in inputs.names if inputs.sources[n][i] is None]
        # extra keys, less output embeddings that a tied template does not store
        extra = [k for k in keys - set(inputs.names) if not (k in TIED_ALIASES and tmpl.tied)]
        problems += [f"{n} missing from model {i}" for n in missing]
        problems += [f"{n} in model {i} but not in the template" for n in sorted(extra)]
    if problems and on_missing == "error" and found is not None:
        found += [f"tensors differ between models: {p}" for p in problems]
    elif problems and on_missing == "error":
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        shown = "; ".join(problems[:5]) + more
        raise MissingTensorError(
            f"tensors differ between models: {shown}; pass on_missing='skip' to merge over the models that have them"
        )
    _check_shapes(inputs, found)
    return inputs


def _check_shapes(inputs: Inputs, found: list[str] | None = None) -> None:
    tmpl = inputs.template
    bad: list[str] = []
    for name in inputs.names:
        want = tmpl.shape(name)
        for i, key in enumerate(inputs.sources[name]):
            got = inputs.models[i].shape(key) if key is not None else want
            if got != want:
                bad.append(f"{name}: {list(want)} in the template vs {list(got)} in model {i}")
    if bad and found is not None:
        found += [f"shapes differ: {b}" for b in bad]
    elif bad:
        vocab = any(h in b.split(":")[0] for b in bad for h in EMBEDDING_HINTS)
        hint = " (the vocabularies differ)" if vocab else ""
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ShapeMismatchError(f"shapes differ{hint}: {'; '.join(bad[:3])}{more}")


NONFINITE_HINT = "fix the model, or pass allow_nonfinite (--allow-nonfinite) to merge it as is"
RESULT_HINT = (
    "the weights or the method's parameters overflow or divide by zero here (e.g. weights that "
    "nearly cancel): change them"
)


def overflow_hint(dtype: torch.dtype) -> str:
    """What to do when values finite before the cast to the output dtype are not after it."""
    return (
        f"the values are finite before the cast to {dtype_name(dtype)} and exceed its range "
        f"(±{torch.finfo(dtype).max:.6g}): write the output in float32 or bfloat16"
    )


def _label(reader: Reader, i: int | None) -> str:
    """A reader as a user knows it: its path on disk, else its place in the merge."""
    path = getattr(reader, "path", None)
    return f"{'the base model' if i is None else f'model {i}'}" + (f" ({path})" if path else "")


def check_inputs(
    inputs: Inputs,
    name: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    idx: Sequence[int],
    finite: bool = True,
) -> None:
    """One-line errors for what a kernel cannot merge: an integer tensor where the template's is
    floating, and (when `finite`) NaN or infinity in a tensor the kernel reads."""
    pairs = ([(None, inputs.base, base)] if base is not None else []) + [
        (i, inputs.models[i], t) for i, t in zip(idx, tensors, strict=True)
    ]
    for i, reader, t in pairs:
        if not t.is_floating_point():
            raise MergeError(
                f"{_label(reader, i)} stores {name} as {t.dtype}, where the template stores "
                "floats; a merge averages floats: convert that model first"
            )
        if finite:
            check_finite([(name, t)], _label(reader, i), NONFINITE_HINT, MergeError)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that holds an object (a model's `config.json`); anything else is one
    `MergeError` line naming the file."""
    return shards.read_json_object(path, MergeError)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device` (`t` itself when it is there already): how `merge_one` moves a kernel's
    inputs to the merge's device and its result back to the CPU."""
    return t.to(device)


def compute_device(spec: MethodSpec, device: torch.device | None) -> torch.device | None:
    """Where `spec`'s kernel runs when the merge asks for `device`: there, but None (the CPU,
    where the readers give the tensors) for the kernels of `CPU_KERNELS` or when none is asked."""
    return None if device is None or spec.name in CPU_KERNELS else device


def merge_one(
    spec: MethodSpec,
    inputs: Inputs,
    name: str,
    weights: Sequence[float],
    cfg: Any,
    stats: dict,
    allow_nonfinite: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Merge one tensor; non-float tensors and tensors only the template has are copied.

    Unless `allow_nonfinite`, a NaN or infinity in a tensor the kernel reads, or in what it
    returns, is a `MergeError` (nothing non-finite reaches a sink).

    `device`: where the kernel runs (`compute_device`): the tensors, read and checked on the CPU,
    are moved there, and the result, cast to the template's dtype there, is moved back to the
    CPU. None: the kernel runs on the tensors as read.

    `dtype`: the dtype of a floating result (and of a floating tensor only the template has), in
    place of the template's; integer and boolean tensors keep theirs. Checked after the cast:
    a value that overflows `dtype` (1e5 in float16) is a `MergeError` unless `allow_nonfinite`.
    """
    base, tensors, idx = inputs.tensors(name)
    # the template's tensor, read once: it is the base where there is one, else model 0's
    if inputs.base is not None and base is not None:
        template = base
    elif idx and idx[0] == 0:
        template = tensors[0]
    else:
        template = inputs.template.get(name)
    if not template.is_floating_point():
        return template
    if not tensors:  # only the template has it: copied, but checked like any input
        who = _label(inputs.template, None if inputs.base is not None else 0)
        if not allow_nonfinite:
            check_finite([(name, template)], who, NONFINITE_HINT, MergeError)
        if dtype is None or template.dtype == dtype:
            return template
        copy = template.to(dtype)
        if not allow_nonfinite:
            check_finite([(name, copy)], f"the copy of {who}", overflow_hint(dtype), MergeError)
        return copy
    check_inputs(inputs, name, base, tensors, idx, finite=not allow_nonfinite)
    ws = [float(weights[i]) for i in idx]
    at = compute_device(spec, device)
    if at is not None:
        base = to_device(base, at) if base is not None else None
        tensors = [to_device(t, at) for t in tensors]
    merged = spec.impl(base, tensors, ws, cfg, Ctx(name, stats, tuple(idx)))
    out = merged.to(template.dtype if dtype is None else dtype)
    if at is not None:
        out = to_device(out, CPU)
    if not allow_nonfinite and nonfinite(out):  # an overflow of the cast, or of the arithmetic
        cast = dtype is not None and not nonfinite(merged)  # finite before the cast
        hint = overflow_hint(dtype) if cast and dtype is not None else RESULT_HINT
        check_finite([(name, out)], f"the {spec.name} merge", hint, MergeError)
    return out


def check_weights(spec: MethodSpec, cfg: Any, weights: Sequence[float]) -> None:
    """Weights are finite numbers; they may not sum to zero where the method divides by the sum
    (the registry entry's `divides_by_weight_sum(cfg)` extra)."""
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, Real)]
    bad += [w for w in weights if isinstance(w, Real) and not math.isfinite(w)]
    if bad:
        raise MergeError(f"merge weights must be finite numbers, got {bad[0]!r}")
    divides = spec.extras.get("divides_by_weight_sum")
    if divides is not None and divides(cfg) and abs(math.fsum(weights)) < 1e-8:
        raise MergeError(
            f"{spec.name} divides by the sum of the weights, and {list(weights)} sums to zero; "
            "change the weights"
        )


def run_merge(
    method: str | MethodSpec,
    inputs: Inputs,
    cfg: Config | Mapping[str, Any] | None,
    sink: Callable[[str, Tensor], None],
    weights: Sequence[float] | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    stats: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    workers: int | None = None,
) -> Config:
    """Merge every tensor of `inputs` with `method` and give each result to `sink`.

    Args:
        method: a registered merge method (`ties`, `reuse/ties`, or its registry entry).
        inputs: readers checked by `plan`.
        cfg: the method's config (a `Config`, a mapping, or None for the paper defaults).
        sink: called once per tensor, in template order.
        weights: one weight per model (default 1.0 each).
        progress: wraps the iteration over names (a progress bar).
        stats: model-level statistics given to the kernels (`ctx.stats`), over `prepare`'s.
        allow_nonfinite: merge NaN and infinite values instead of refusing them (in the inputs
            and in what the kernel returns).
        device: where each tensor's kernel runs (`merge_one`; the kernels of `CPU_KERNELS` stay
            on the CPU); the results reach `sink` on the CPU. None: on the tensors as read. The
            `prepare` pass (e.g. TIES's model-wide thresholds) reads on the CPU.
        dtype: the dtype of every floating result given to `sink` (`merge_one`); None: the
            template's dtype of each tensor.
        workers: how many tensors are merged at once on threads (the results still reach `sink`
            one at a time, in template order, and are the same bit for bit). None:
            `merges_at_once` (2 on the CPU, at most torch's thread count).

    Returns:
        The resolved config.
    """
    spec = kernel_spec(method)
    config = spec.resolve(cfg)
    check_arity(spec, inputs)
    ws = list(weights) if weights is not None else [1.0] * len(inputs.models)
    if len(ws) != len(inputs.models):
        raise MergeError(f"{len(ws)} weights for {len(inputs.models)} models")
    check_weights(spec, config, ws)
    prepare: Prepare | None = spec.extras.get("prepare")
    stats = {**(prepare(inputs, config) if prepare else {}), **(stats or {})}
    if workers is None:
        workers = merges_at_once(inputs, spec, device)

    def one(name: str) -> Tensor:
        return merge_one(spec, inputs, name, ws, config, stats, allow_nonfinite, device, dtype)

    merged = in_order(one, inputs.names, workers)
    try:
        for name in (progress or iter)(inputs.names):
            sink(name, next(merged))
    finally:  # on an error of the sink too: cancel what waits, wait for what runs
        merged.close()
    return config


def merges_at_once(inputs: Inputs, spec: MethodSpec, device: torch.device | None) -> int:
    """How many tensors `run_merge` merges at once by default: `MERGE_WORKERS`, at most torch's
    thread count (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`: one), on the CPU with readers
    that may be read from several threads (their `concurrent` attribute); else one."""
    readers = [r for r in (inputs.base, *inputs.models) if r is not None]
    on_cpu = compute_device(spec, device) in (None, CPU)
    if not (on_cpu and all(getattr(r, "concurrent", False) for r in readers)):
        return 1
    return max(1, min(MERGE_WORKERS, torch.get_num_threads()))


In = TypeVar("In")
Out = TypeVar("Out")


def in_order(fn: Callable[[In], Out], items: Iterable[In], workers: int) -> Iterator[Out]:
    """`fn` over `items`, up to `workers` calls at once on threads, the results in the items'
    order. At most `workers` calls run ahead of the consumer; an error is raised where its item's
    result would have come, and the calls not yet started are cancelled."""
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="lfm-merge") as pool:
        pending: deque[Future[Out]] = deque(
            pool.submit(fn, x) for x in itertools.islice(it, workers)
        )
        try:
            while pending:
                done = pending.popleft().result()
                pending.extend(pool.submit(fn, x) for x in itertools.islice(it, 1))
                yield done
        finally:
            for f in pending:
                f.cancel()


def check_arity(spec: MethodSpec, inputs: Inputs) -> None:
    """A one-line error when the method needs a base model or another number of models."""
    n = len(inputs.models)
    least, most = spec.extras.get("min_models", 1), spec.extras.get("max_models")
    if spec.extras.get("needs_base", True) and inputs.base is None:
        raise MergeError(f"{spec.name} needs a base model")
    if n < least or (most is not None and n > most):
        raise MergeError(
            f"{spec.name} merges {least} to {most if most is not None else 'any number of'} "
            f"models, got {n}"
        )


def merge_state_dicts(
    method: str,
    base_sd: Mapping[str, Tensor] | None,
    sds: Sequence[Mapping[str, Tensor]],
    cfg: Config | Mapping[str, Any] | None = None,
    *,
    weights: Sequence[float] | None = None,
    on_missing: OnMissing = "error",
    stats: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """Merge state dicts held in memory with the same driver the streaming engine uses.

    `lfm.registry.run("reuse/<method>", models, base=...)` does the same for any white-box
    handles (modules, `LocalClassifier`s, state dicts, weight files).

    Args:
        method: a registered merge method.
        base_sd: the base model's state dict (None for methods that need none: linear, slerp).
        sds: the state dicts to merge.
        cfg: the method's config, a mapping of its fields, or None for the paper defaults.
        weights: one weight per model (default 1.0 each).
        on_missing: "error" (default) or "skip": merge a tensor over the models that have it.
        stats: statistics held in memory for data-aware methods (e.g. `{"per_model": [...]}`).
        allow_nonfinite: merge NaN and infinite values instead of refusing them.
    """
    base = DictReader(base_sd) if base_sd is not None else None
    inputs = plan(base, [DictReader(sd) for sd in sds], on_missing)
    out: dict[str, Tensor] = {}
    run_merge(method, inputs, cfg, out.__setitem__, weights, stats=stats,
              allow_nonfinite=allow_nonfinite)  # fmt: skip
    return out
