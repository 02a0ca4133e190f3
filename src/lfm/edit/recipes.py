"""What the `lfm edit` commands run, as library functions: compute a patch, evaluate it, write an
edited model folder and restore it, trace where a fact is recalled.

    from lfm.edit import recipes
    reqs = recipes.requests_from(prompt="The Eiffel Tower is located in the city of",
                                 subject="Eiffel Tower", target="Rome")
    done = recipes.apply("smollm2-135m", "rome", reqs, out="eiffel.safetensors")
    report = recipes.evaluate("smollm2-135m", done.path)

`model` is an asset name or a folder (loaded here), or a `LocalModel` already in memory. A weight
patch is a safetensors file (`Patch`), a memory patch a JSON file (`MemoryPatch`); `load_patch`
reads either. Every error a user can cause is an `LfmError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm import registry
from lfm.config import Config
from lfm.edit.memory import MemoryPatch
from lfm.edit.patch import Patch, Undo, revert_folder, save_edited
from lfm.edit.requests import Request, read_requests
from lfm.edit.sequential import AlphaEditState, alphaedit_step
from lfm.edit.trace import Trace, causal_trace, plot
from lfm.errors import LfmError

ConfigLike = str | Path | Config | Mapping[str, Any] | None


def requests_from(
    prompt: str | None = None,
    subject: str | None = None,
    target: str | None = None,
    file: str | Path | None = None,
) -> list[Request]:
    """The requests of a JSON-lines `file`, else the one given by prompt, subject and target."""
    if file is not None:
        return read_requests(file)
    if not (prompt and subject and target):
        raise LfmError("give --prompt, --subject and --target, or --requests FILE.jsonl")
    return [Request(prompt, subject, target)]


def load_handle(model: Any) -> Any:
    """A `LocalModel` for an asset name or folder; a handle is returned as it is."""
    if isinstance(model, str | Path):
        from lfm.assets import load_model

        return load_model(str(model))
    return model


def load_patch(path: str | Path) -> Patch | MemoryPatch:
    """A weight patch (safetensors) or a memory patch (JSON), by the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LfmError(f"cannot read {path}: {e}") from None
    # safetensors opens with its header's length, a little-endian u64 whose top byte is 0;
    # JSON never holds a NUL byte
    if head.lstrip()[:1] == b"{" and b"\x00" not in head:
        return MemoryPatch.load(path)
    return Patch.load(path)


def _config(spec: Any, config: ConfigLike) -> Config:
    if isinstance(config, str | Path):
        return spec.config.load(config)  # type: ignore[no-any-return]
    return spec.resolve(config)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Applied:
    """What `apply` wrote."""

    method: str  # the registry name
    edits: int  # requests in the patch
    where: str  # the edited modules, or "the context" for a memory patch
    path: Path  # the patch file
    state: Path | None = None  # the sequential AlphaEdit state, advanced


def apply(
    model: Any,
    method: str,
    requests: Request | Sequence[Request],
    out: str | Path,
    *,
    config: ConfigLike = None,
    on: Sequence[str | Path] = (),
    state: str | Path | None = None,
) -> Applied:
    """Compute an edit patch for `model` and save it at `out` (the model itself is not changed).

    Args:
        model: an asset name or folder, or a `LocalModel`.
        method: a registered editor (`rome`, `memit`, `alphaedit`, `ft_l`, `ike`).
        requests: the edits.
        out: the patch file (safetensors for weight patches, JSON for a memory patch).
        config: the method's config: a YAML/JSON file, a mapping or a config (None: defaults).
        on: earlier weight patches, applied in order before this edit (and reverted after).
        state: sequential AlphaEdit's state file: read if it exists, advanced once the patch is
            written.
    """
    spec = registry.get(method, area="edit")
    reqs = [requests] if isinstance(requests, Request) else list(requests)
    cfg = _config(spec, config)
    if state is not None and spec.name != "alphaedit":
        raise LfmError(f"--state is for sequential AlphaEdit; {spec.name} keeps no state")
    handle = load_handle(model)
    undos = _apply_earlier(handle, on)
    try:
        if state is None:
            patch = spec.fn(handle, reqs, cfg)
            path = patch.save(out)
        else:  # the state advances only once its patch is written
            before = AlphaEditState.load(state) if Path(state).exists() else None
            patch, after = alphaedit_step(handle, reqs, before, cfg)
            path = patch.save(out)
            after.save(state)
    finally:
        for undo in reversed(undos):
            undo.revert(handle.model)
    where = ", ".join(patch.modules) if isinstance(patch, Patch) else "the context"
    return Applied(spec.name, len(reqs), where, Path(path), Path(state) if state else None)


def _apply_earlier(handle: Any, patches: Sequence[str | Path]) -> list[Undo]:
    undos: list[Undo] = []
    try:
        for p in patches:
            patch = load_patch(p)
            if not isinstance(patch, Patch):
                raise LfmError(f"{p} is a memory patch; --on takes weight patches")
            undos.append(patch.apply(handle.model))
    except LfmError:
        for undo in reversed(undos):
            undo.revert(handle.model)
        raise
    return undos


@dataclass(frozen=True)
class Evaluation:
    """Greedy completions before and after a patch, and log P(target | prompt) after it."""

    completions: list[dict[str, str]]  # {"prompt", "before", "after"} per prompt
    logprobs: list[tuple[Request, float]]  # per request of the patch


def evaluate(
    model: Any,
    patch: str | Path | Patch | MemoryPatch,
    prompts: Sequence[str] = (),
    max_new_tokens: int = 12,
) -> Evaluation:
    """Complete `prompts` (default: the patch's) greedily with and without the patch.

    A weight patch is applied to the loaded model and reverted before returning; a memory patch
    wraps the handle.
    """
    handle = load_handle(model)
    patch = load_patch(patch) if isinstance(patch, str | Path) else patch
    prompts = list(prompts) or [r.prompt for r in patch.requests]
    targets = [f" {r.target}" for r in patch.requests]
    if isinstance(patch, MemoryPatch):
        edited = patch.apply(handle)
        after = edited.generate(prompts, max_new_tokens=max_new_tokens)
        scores = edited.score([r.prompt for r in patch.requests], targets)
    else:
        undo = patch.apply(handle.model)
        try:
            after = handle.generate(prompts, max_new_tokens=max_new_tokens)
            scores = handle.score([r.prompt for r in patch.requests], targets)
        finally:
            undo.revert(handle.model)
    before = handle.generate(prompts, max_new_tokens=max_new_tokens)
    rows = [{"prompt": p, "before": b, "after": a}
            for p, b, a in zip(prompts, before, after, strict=True)]  # fmt: skip
    return Evaluation(rows, [(r, float(s)) for r, s in zip(patch.requests, scores, strict=True)])


def patch_apply(model: Any, patch: str | Path, out: str | Path) -> Path:
    """Write `model` with a weight patch applied as a Hugging Face folder at `out`, with the
    original tensors (`edit-undo.safetensors`) for `patch_revert`."""
    handle = load_handle(model)
    loaded = load_patch(patch)
    if not isinstance(loaded, Patch):
        raise LfmError(
            f"{patch} is a memory patch: it changes no weights (`lfm edit eval` uses it)"
        )
    undo = loaded.apply(handle.model)
    try:
        return save_edited(handle, undo, out)
    finally:
        undo.revert(handle.model)


def patch_revert(folder: str | Path, out: str | Path) -> Path:
    """Restore the original weights of a folder written by `patch_apply`, bit for bit, at `out`."""
    return revert_folder(folder, out)


@dataclass(frozen=True)
class Traced:
    """A causal trace and where it was written."""

    trace: Trace
    png: Path  # the heat map
    json: Path  # the numbers
    peak: tuple[float, int, int]  # the largest p(l, i), its layer and token index


def trace(
    model: Any,
    prompt: str,
    subject: str,
    out: str | Path,
    *,
    answer: str | None = None,
    samples: int = 10,
    noise: float = 3.0,
) -> Traced:
    """Causal tracing (ROME §2): the layer × token heat map at `out` (PNG), its numbers beside it
    (.json); see `lfm.edit.trace.causal_trace`."""
    t = causal_trace(
        load_handle(model), prompt, subject, answer=answer, samples=samples, noise=noise
    )
    png = plot(t, out)
    data = t.save(Path(out).with_suffix(".json"))
    cells = ((v, layer, i) for layer, row in enumerate(t.effect) for i, v in enumerate(row))
    return Traced(t, png, data, max(cells, key=lambda x: x[0]))
