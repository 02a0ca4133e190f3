"""What the `lfm edit` commands run, as library functions: compute a patch, evaluate it, write an
edited model folder and restore it, trace where a fact is recalled.

    from lfm.edit import recipes
    reqs = recipes.requests_from(prompt="The Eiffel Tower is located in the city of",
                                 subject="Eiffel Tower", target="Rome")
    done = recipes.apply("smollm2-135m", "rome", reqs, out="eiffel.safetensors")
    report = recipes.evaluate("smollm2-135m", done.path)
    scores = recipes.evaluate_facts("smollm2-135m", "facts.jsonl", done.path)  # efficacy ... Score
    scores = recipes.evaluate_ike("smollm2-135m", "facts.jsonl")  # the same, IKE in context
    trained = recipes.train_mend("smollm2-135m", "lifelong", "mend-editor", steps=1000)

`model` is an asset name or a folder (loaded here), or a `LocalModel` already in memory. A weight
patch is a safetensors file (`Patch`), so are a GRACE codebook (`CodebookPatch`) and a WISE
side memory (`WiseMemory`), each with its own format tag, a memory patch a JSON file
(`MemoryPatch`); `load_patch` reads any of them. Every error a user can cause is an `LfmError`.

`apply`, `patch_apply`, `patch_revert`, `trace` and `train_mend` write a run directory under
`root` (`<root>/<stamp>-edit-<method>/`, `...-patch-apply/`, `...-patch-revert/`,
`...-edit-trace/`, `...-edit-train-mend/`): its
manifest holds the options as plain data, the SHA-256 of every file or folder read (the model's,
the requests, the config, earlier patches, the state; a patch or folder inside another run
directory names that run as a parent) and where the output was written; it is marked `done` once
the output is complete, `failed: ...` otherwise. The output itself stays where it was asked for.

The recipes say what they are doing through `lfm.edit.progress` (stage lines and tqdm bars),
silent unless run inside `progress.reporting(fn)`, as the CLI runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm import registry
from lfm.access import Access, access_of, module_of, narrow
from lfm.config import Config
from lfm.core.io import read_meta
from lfm.edit import progress
from lfm.edit.facts import Fact, evaluate_fact, fill_true, read_facts, summarise
from lfm.edit.grace import FORMAT as GRACE_FORMAT
from lfm.edit.grace import CodebookPatch
from lfm.edit.memory import MemoryPatch, ike
from lfm.edit.patch import (
    Delta,
    Patch,
    Undo,
    linear_weight,
    make_patch,
    revert_folder,
    save_edited,
)
from lfm.edit.requests import Request, read_requests
from lfm.edit.sequential import AlphaEditState, alphaedit_step
from lfm.edit.trace import Trace, causal_trace, plot
from lfm.edit.ultraedit import UltraEditState, ultraedit_step
from lfm.edit.wise import FORMAT as WISE_FORMAT
from lfm.edit.wise import WiseMemory, wise_step
from lfm.errors import LfmError
from lfm.runs import Run, on_disk

ConfigLike = str | Path | Config | Mapping[str, Any] | None

# The editors whose state carries from one run to the next (`--state FILE`): (state, one turn).
# WISE's state is its side memory itself: its step returns the memory as the patch and the state.
STATEFUL: dict[str, tuple[Any, Any]] = {
    "alphaedit": (AlphaEditState, alphaedit_step),
    "ultraedit": (UltraEditState, ultraedit_step),
    "wise": (WiseMemory, wise_step),
}


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


def _name(model: Any) -> str:
    """A model as plain data: its name or path, or a handle's display name."""
    return str(model) if isinstance(model, str | Path) else str(getattr(model, "name", model))


def _source(model: Any) -> Path | None:
    """The file or folder a model is read from (None for a handle in memory or a hub name)."""
    from lfm.assets.models import source_path

    return source_path(model) if isinstance(model, str | Path) else None


def _wrote(run: Run, *paths: str | Path) -> None:
    """Record in the run's manifest where an output outside the run directory was written."""
    run.manifest["outputs"].extend(str(p) for p in paths)


def load_handle(model: Any) -> Any:
    """A `LocalModel` for an asset name or folder; a handle is returned as it is."""
    if isinstance(model, str | Path):
        from lfm.assets import load_model

        progress.say(f"loading the model {model}")
        return load_model(str(model))
    return model


def load_patch(path: str | Path) -> Patch | CodebookPatch | WiseMemory | MemoryPatch:
    """A weight patch, a GRACE codebook or a WISE side memory (safetensors, by the format tag) or
    a memory patch (JSON), by the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LfmError(f"cannot read {path}: {e}") from None
    # safetensors opens with its header's length, a little-endian u64 whose top byte is 0;
    # JSON never holds a NUL byte
    if head.lstrip()[:1] == b"{" and b"\x00" not in head:
        return MemoryPatch.load(path)
    tag = read_meta(path).get("format")
    if tag == GRACE_FORMAT:
        return CodebookPatch.load(path)
    if tag == WISE_FORMAT:
        return WiseMemory.load(path)
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
    state: Path | None = None  # the lifelong state (AlphaEdit, UltraEdit, WISE), advanced
    run: Path | None = None  # the run directory


def apply(
    model: Any,
    method: str,
    requests: Request | Sequence[Request] | str | Path,
    out: str | Path,
    *,
    config: ConfigLike = None,
    on: Sequence[str | Path] = (),
    state: str | Path | None = None,
    root: str | Path = "runs",
    facts: str | Path | None = None,
    sequential: bool = False,
    offload: str | Path | None = None,
) -> Applied:
    """Compute an edit patch for `model` and save it at `out` (the model itself is not changed).

    Args:
        model: an asset name or folder, or a `LocalModel`.
        method: a registered editor (`rome`, `memit`, `alphaedit`, `ft_l`, `ike`).
        requests: the edits, or a JSON-lines file of them (hashed into the run's manifest).
        out: the patch file (safetensors for weight patches, JSON for a memory patch).
        config: the method's config: a YAML/JSON file, a mapping or a config (None: defaults).
        on: earlier patches, applied in order before this edit (and reverted after); for a
            method that continues a patch of its own kind (GRACE: `continues` on its registry
            entry), that patch is grown instead (`grace(..., codebook=...)`).
        state: the lifelong state file of AlphaEdit, UltraEdit or WISE (its side memory): read if
            it exists, advanced once the patch is written.
        root: where the run directory is created (`<root>/<stamp>-edit-<method>/`).
        facts: a facts file (`lfm.edit.facts.read_facts`) whose edits are made (then
            `requests` is left empty); hashed into the run's manifest.
        sequential: edit one request at a time, each on the weights the earlier ones edited,
            into one patch of their summed deltas (`sequential_patch`); else all in one call
            (a batch for the methods that take one).
        offload: keep in memory only the blocks the method edits (and those the `on` patches
            change), the embeddings and the head; every other block stays on disk and is read
            when it runs (`lfm.assets.load_offloaded`; weights not stored as safetensors are
            copied to this folder first). For models larger than memory; the patch is the same.
    """
    spec = registry.get(method, area="edit")
    file = requests if isinstance(requests, str | Path) else None
    if facts is not None:
        reqs = [f.request for f in read_facts(facts)]
    elif file is not None:
        reqs = read_requests(file)
    else:
        reqs = [requests] if isinstance(requests, Request) else list(requests)
    cfg = _config(spec, config)
    if state is not None and spec.name not in STATEFUL:
        raise LfmError(
            f"--state is for the lifelong editors ({', '.join(STATEFUL)}); {spec.name} keeps no state"
        )
    if sequential and state is not None:
        raise LfmError("--sequential edits within one patch; --state carries the state across runs")
    options = {"method": spec.name, "model": _name(model), "config": cfg.to_dict(),
               "requests": [r.to_dict() for r in reqs], "on": [str(p) for p in on],
               "state": str(state) if state else None, "out": str(out),
               "sequential": sequential, "offload": str(offload) if offload else None}  # fmt: skip
    files = {"model": _source(model), "requests": file, "facts": facts,
             "config": config if isinstance(config, str | Path) else None,
             **{f"on{i}": p for i, p in enumerate(on)}, "state": state,
             "editor": getattr(cfg, "editor", None)}  # fmt: skip
    with Run(f"edit-{spec.name}", options, inputs=on_disk(files), root=root) as run:
        earlier, grown = _continued(spec, on)
        handle = (
            load_handle(model)
            if offload is None
            else _load_offloaded(spec, model, cfg, earlier, offload)
        )
        undos = _apply_earlier(handle, earlier)
        try:
            if state is None:
                patch = (
                    sequential_patch(spec, handle, reqs, cfg)
                    if sequential
                    else spec.fn(handle, reqs, cfg, **grown)
                )
                progress.say(f"writing the patch -> {out}")
                path = patch.save(out)
            else:  # the state advances only once its patch is written
                kind, step = STATEFUL[spec.name]
                before = kind.load(state) if Path(state).exists() else None
                patch, after = step(handle, reqs, before, cfg)
                progress.say(f"writing the patch -> {out} and the state -> {state}")
                path = patch.save(out)
                after.save(state)
        finally:
            for undo in reversed(undos):
                undo.revert(handle.model)
        _wrote(run, path, *([state] if state else []))
    where = ", ".join(patch.modules) if hasattr(patch, "modules") else "the context"
    return Applied(
        spec.name, len(reqs), where, Path(path), Path(state) if state else None, run.path
    )


def _load_offloaded(
    spec: Any, model: Any, cfg: Config, earlier: Sequence[str | Path], folder: str | Path
) -> Any:
    """The model with only the blocks the edit and the earlier patches touch kept in memory."""
    blocks = spec.extras.get("blocks")
    if blocks is None:
        takes = [m.name for m in registry.methods("edit") if "blocks" in m.extras]
        raise LfmError(
            f"--offload is for the methods that edit a few blocks ({', '.join(takes)}); "
            f"{spec.name} needs the model in memory"
        )
    return offloaded(model, folder, earlier, lambda skeleton: blocks(skeleton, cfg))


def offloaded(
    model: str | Path,
    folder: str | Path,
    patches: Sequence[Any] = (),
    blocks: Any = None,
) -> Any:
    """`model` with only the blocks an edit touches in memory, every other one on disk
    (`lfm.assets.load_offloaded`): the blocks that `blocks(skeleton)` names (the model's modules
    on the meta device; no weight is read to find them) and those the `patches` (files or
    loaded) change or hook into."""
    from lfm.assets.models import load_offloaded, model_skeleton
    from lfm.core.layouts import block_of, get_layout

    if not isinstance(model, str | Path):
        raise LfmError("--offload loads the model itself: give its name or folder, not a handle")
    skeleton = model_skeleton(model)
    layers = get_layout(skeleton).layers
    keep = set(blocks(skeleton)) if blocks is not None else set()
    for p in patches:
        touched = getattr(load_patch(p) if isinstance(p, str | Path) else p, "modules", [])
        keep |= {b for b in (block_of(m, layers) for m in touched) if b is not None}
    kept = ", ".join(map(str, sorted(keep))) or "none"
    progress.say(f"loading the model {model}: blocks {kept} in memory, the others on disk "
                 "(each read when it runs)")  # fmt: skip
    return load_offloaded(model, sorted(keep), folder)


def sequential_patch(spec: Any, handle: Any, reqs: Sequence[Request], cfg: Config) -> Patch:
    """Edit one request at a time with the method `spec`, each on the weights the earlier edits
    left; one weight patch of the summed deltas, made for the model as it was (which is restored
    after). A memory patch has no weights to sum: it is refused."""
    model, undos, modules = handle.model, [], {}
    try:
        for i, r in enumerate(reqs, 1):
            with progress.step(i, len(reqs)):
                patch = spec.fn(handle, [r], cfg)
            if not isinstance(patch, Patch):
                raise LfmError(f"{spec.name} makes {_kind(patch)}; --sequential sums weight edits")
            undos.append(patch.apply(model))
            modules.update(dict.fromkeys(patch.modules))
        edited = {m: linear_weight(model, m).detach().clone() for m in modules}
    finally:
        for undo in reversed(undos):
            undo.revert(model)
    deltas = [Delta(m, dense=w - linear_weight(model, m)) for m, w in edited.items()]
    return make_patch(model, deltas, reqs, spec.name, cfg)


def _continued(spec: Any, on: Sequence[str | Path]) -> tuple[list[str | Path], dict[str, Any]]:
    """`--on` split into the patches applied before the edit and, as a keyword argument, the one
    the method grows: a method registered with `continues=(keyword, kind)` (GRACE: its codebook)
    continues an earlier patch of that kind instead of having it applied."""
    keyword, kind = spec.extras.get("continues", (None, None))
    if keyword is None:
        return list(on), {}
    loaded = [(p, load_patch(p)) for p in on]
    own = [patch for _, patch in loaded if isinstance(patch, kind)]
    if len(own) > 1:
        raise LfmError(f"--on: give one earlier {spec.name} patch to continue, not {len(own)}")
    if own:
        progress.say(f"continuing the {spec.name} patch of {len(own[0].requests)} edit(s)")
    rest = [p for p, patch in loaded if not isinstance(patch, kind)]
    return rest, ({keyword: own[0]} if own else {})


def _apply_earlier(handle: Any, patches: Sequence[str | Path]) -> list[Undo]:
    undos: list[Undo] = []
    try:
        for p in patches:
            progress.say(f"applying the earlier patch {p}")
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
    patch: str | Path | Patch | CodebookPatch | MemoryPatch,
    prompts: Sequence[str] = (),
    max_new_tokens: int = 12,
) -> Evaluation:
    """Complete `prompts` (default: the patch's) greedily with and without the patch.

    A weight patch is applied to the loaded model and reverted before returning (a GRACE
    codebook or a WISE side memory is installed as hooks and removed); a memory patch wraps the
    handle.
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
        undo = patch.apply(_weights(handle))
        try:
            after = handle.generate(prompts, max_new_tokens=max_new_tokens)
            scores = handle.score([r.prompt for r in patch.requests], targets)
        finally:
            undo.revert(handle.model)
    before = handle.generate(prompts, max_new_tokens=max_new_tokens)
    rows = [{"prompt": p, "before": b, "after": a}
            for p, b, a in zip(prompts, before, after, strict=True)]  # fmt: skip
    return Evaluation(rows, [(r, float(s)) for r, s in zip(patch.requests, scores, strict=True)])


@dataclass(frozen=True)
class FactScores:
    """CounterFact metrics in percent (efficacy, paraphrase, neighbourhood, score) of a fact set
    on the model, and with a patch applied (None: no patch given)."""

    facts: list[Fact]  # with `true` filled in where the file left it out
    before: dict[str, float]
    after: dict[str, float] | None = None


def evaluate_facts(
    model: Any, facts: str | Path | Sequence[Fact], patch: str | Path | Any = None
) -> FactScores:
    """The edit metrics of `facts` (a facts file or `Fact`s) before and, given `patch`, after it.

    Metrics as in `lfm.edit.facts` (whole objects compared pairwise: target against `true`);
    a fact without `true` takes the unedited model's own answer (`fill_true`). Neighbourhood
    prompts naming another subject of the set are left out, as for a batch of edits.
    """
    rows = read_facts(facts) if isinstance(facts, str | Path) else list(facts)
    handle = load_handle(model)  # after the facts: a bad file fails before a model loads
    rows = fill_true(handle, rows)
    subjects = [f.subject for f in rows]

    def metrics(h: Any, state: str) -> dict[str, float]:
        each = progress.bar(rows, desc=f"facts {state}", unit="fact")
        return summarise([evaluate_fact(h, f, edited=subjects) for f in each])

    before = metrics(handle, "before")
    if patch is None:
        return FactScores(rows, before)
    loaded = load_patch(patch) if isinstance(patch, str | Path) else patch
    if isinstance(loaded, MemoryPatch):  # it wraps the handle
        return FactScores(rows, before, metrics(loaded.apply(handle), f"with {loaded.method}"))
    undo = loaded.apply(_weights(handle))  # weights changed, or a codebook / side memory hooked in
    try:
        after = metrics(handle, "with the patch")
    finally:
        undo.revert(handle.model)
    return FactScores(rows, before, after)


def evaluate_ike(
    model: Any, facts: str | Path | Sequence[Fact], config: ConfigLike = None
) -> FactScores:
    """The edit metrics of `facts` without context (`before`) and with IKE (`after`): all the
    facts in one memory patch (`lfm.edit.memory.ike`), each query read after the demonstrations
    and the stored fact nearest to it. IKE edits no weight, so this is its whole evaluation.

    Args:
        model: an asset name or folder (loaded, then narrowed to SCORES: IKE needs no more), or
            a handle that gives scores (a narrowed one, a `lfm.serve.RemoteModel`).
        facts: a facts file (`lfm.edit.facts.read_facts`) or `Fact`s: the edits, and their
            paraphrase and neighbourhood prompts.
        config: IKE's config (a YAML/JSON file, a mapping or an `IkeConfig`; None: defaults,
            the demonstrations drawn from the packaged fact set).
    """
    rows = read_facts(facts) if isinstance(facts, str | Path) else list(facts)
    cfg = _config(registry.get("ike", area="edit"), config)
    handle = load_handle(model)
    if access_of(handle) > Access.SCORES:
        handle = narrow(handle, Access.SCORES)
    patch = ike(handle, [f.request for f in rows], cfg)  # checks the handle's access
    return evaluate_facts(handle, rows, patch)


def _weights(handle: Any) -> Any:
    """The module a weight patch or codebook goes into; a one-line `AccessError` for a handle
    without weights (a narrowed or served model takes only memory patches)."""
    return module_of(handle, "a weight patch, GRACE codebook or WISE memory")


def _kind(patch: Any) -> str:
    """What a patch that changes no weights is, in words."""
    if isinstance(patch, CodebookPatch):
        return "a GRACE codebook"
    return "a WISE side memory" if isinstance(patch, WiseMemory) else "a memory patch"


def patch_apply(
    model: Any,
    patch: str | Path,
    out: str | Path,
    *,
    root: str | Path | None = None,
    stream: bool = False,
) -> Path:
    """Write `model` with a weight patch applied as a Hugging Face folder at `out`, with the
    original tensors (`edit-undo.safetensors`) for `patch_revert`.

    A model named by asset or folder loads where the process placement says (`load_model`: the
    CLI's `--device` and `--dtype`; the CPU in float32 otherwise); the patch applies only if the
    weights, in that dtype, are those it was made from, ΔW is formed on their device and added in
    their dtype, and the originals saved are the weights as loaded (their dtype), so that
    `patch_revert` restores them bit for bit. The folder is written in that dtype.

    `stream`: never load the model; read its safetensors files and write the folder one tensor
    at a time (`lfm.edit.stream`), the same weights in the same dtype, for a model larger than
    memory. `model` is then a name or a folder, not a handle.

    `root`: create a run directory there (`<root>/<stamp>-patch-apply/`, its inputs the model and
    the patch); None: none (as in a pipeline step, whose own run directory records it).
    """
    files = {"model": _source(model), "patch": patch}
    options = {"model": _name(model), "patch": str(patch), "out": str(out), "stream": stream}
    loaded = load_patch(patch)  # refused before a run directory or the model is made
    if not isinstance(loaded, Patch):
        raise LfmError(
            f"{patch} is {_kind(loaded)}: it changes no weights (`lfm edit eval` uses it)"
        )
    if stream and not isinstance(model, str | Path):
        raise LfmError("--stream reads the model from disk: give its name or folder, not a handle")
    with _maybe_run("patch-apply", options, files, root) as run:
        if stream:
            path = _stream_apply(model, loaded, out)
        else:
            handle = load_handle(model)
            undo = loaded.apply(handle.model)
            try:
                path = save_edited(handle, undo, out)
            finally:
                undo.revert(handle.model)
        if run is not None:
            _wrote(run, path)
    return path


def _stream_apply(model: str | Path, patch: Patch, out: str | Path) -> Path:
    """`patch` applied to the folder of `model` tensor by tensor, in the dtype `load_model` would
    give its weights (`--dtype`; float32 otherwise)."""
    from lfm.assets.models import model_folder, model_skeleton
    from lfm.core import placement
    from lfm.edit.stream import stream_apply

    folder, skeleton = model_folder(model), model_skeleton(model)
    progress.say(f"applying {patch.method}'s patch to {folder}, one tensor at a time")
    return stream_apply(patch, folder, out, skeleton, placement.current().dtype)


def patch_revert(folder: str | Path, out: str | Path, *, root: str | Path | None = "runs") -> Path:
    """Restore the original weights of a folder written by `patch_apply`, bit for bit, at `out`
    (`root`: its run directory `<root>/<stamp>-patch-revert/`, the folder its input; None: none).

    The folder loads in the dtype of its originals (`revert_folder`), not the process default's:
    any other would round the weights it restores."""
    options = {"folder": str(folder), "out": str(out)}
    with _maybe_run("patch-revert", options, {"folder": folder}, root) as run:
        path = revert_folder(folder, out)
        if run is not None:
            _wrote(run, path)
    return path


def _maybe_run(
    name: str, options: dict[str, Any], files: dict[str, Any], root: str | Path | None
) -> AbstractContextManager[Run | None]:
    return nullcontext() if root is None else Run(name, options, on_disk(files), root=root)


@dataclass(frozen=True)
class Traced:
    """A causal trace and where it was written."""

    trace: Trace
    png: Path  # the heat map
    json: Path  # the numbers
    peak: tuple[float, int, int]  # the largest p(l, i), its layer and token index
    run: Path | None = None  # the run directory


def trace(
    model: Any,
    prompt: str,
    subject: str,
    out: str | Path,
    *,
    answer: str | None = None,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    root: str | Path = "runs",
) -> Traced:
    """Causal tracing (ROME §2): the layer × token heat map at `out` (PNG), its numbers beside it
    (.json); see `lfm.edit.trace.causal_trace` (`seed`: the noise's). The run directory
    `<root>/<stamp>-edit-trace/` records the options, the model's hash and the two files written."""
    options = {"model": _name(model), "prompt": prompt, "subject": subject, "answer": answer,
               "samples": samples, "noise": noise, "seed": seed, "out": str(out)}  # fmt: skip
    with Run("edit-trace", options, inputs=on_disk({"model": _source(model)}), root=root) as run:
        handle = load_handle(model)
        progress.say(f"tracing: {samples} noise sample(s) per restored state")
        t = causal_trace(
            handle, prompt, subject, answer=answer, samples=samples, noise=noise, seed=seed
        )
        progress.say(f"writing the heat map -> {out}")
        png = plot(t, out)
        data = t.save(Path(out).with_suffix(".json"))
        _wrote(run, png, data)
    cells = ((v, layer, i) for layer, row in enumerate(t.effect) for i, v in enumerate(row))
    return Traced(t, png, data, max(cells, key=lambda x: x[0]), run.path)


@dataclass(frozen=True)
class TrainedEditor:
    """What `train_mend` wrote."""

    path: Path  # the editor's folder
    steps: int
    facts: int  # training facts
    first: dict[str, float]  # mean loss parts ("edit", "loc", "loss") over the first tenth
    last: dict[str, float]  # the same over the last tenth
    run: Path  # the run directory


def mend_facts(facts: str | Path) -> list[Fact]:
    """The training facts of `train_mend`: a packaged set by name (`lifelong`: its train split;
    `facts`: all 316), else a facts file (`lfm.edit.facts.read_facts`)."""
    from lfm.edit.facts import PACKAGED, load_facts

    if str(facts) == "lifelong":
        return load_facts(name="lifelong", split="train")
    if str(facts) in PACKAGED and not Path(facts).exists():
        return load_facts(name=str(facts))
    return read_facts(facts)


def train_mend(
    model: Any,
    facts: str | Path,
    out: str | Path,
    *,
    steps: int = 1000,
    config: ConfigLike = None,
    root: str | Path = "runs",
) -> TrainedEditor:
    """Meta-train a MEND editor (`lfm.edit.mend.train_mend`) on `facts` and save it in the folder
    `out` (`editor.safetensors` and `editor.json`), for `apply(..., "mend", config={"editor":
    out})`.

    Args:
        model: an asset name or folder, or a `LocalModel`.
        facts: `lifelong` (the lifelong set's train split), `facts`, or a facts file: each fact's
            prompt and paraphrases are the equivalent inputs, its neighbourhood prompts the
            unrelated ones.
        out: the editor's folder.
        steps: meta-training steps.
        config: MEND's config (a YAML/JSON file, a mapping or a `MendConfig`; None: defaults).
        root: where the run directory is created (`<root>/<stamp>-edit-train-mend/`); its
            manifest records the loss parts per step (`curves.png`).
    """
    from lfm.edit.mend import train_mend as meta_train

    if steps < 1:
        raise LfmError(f"--steps must be at least 1, not {steps}")
    data = mend_facts(facts)  # a bad file fails before a model loads
    cfg = _config(registry.get("mend", area="edit"), config)
    file = None if str(facts) in ("lifelong", "facts") and not Path(facts).exists() else facts
    options = {"model": _name(model), "facts": str(facts), "steps": steps,
               "config": cfg.to_dict(), "out": str(out)}  # fmt: skip
    files = {"model": _source(model), "facts": file,
             "config": config if isinstance(config, str | Path) else None}  # fmt: skip
    with Run("edit-train-mend", options, inputs=on_disk(files), root=root) as run:
        handle = load_handle(model)
        progress.say(f"meta-training MEND on {len(data)} facts, {steps} steps")
        editor, hist = meta_train(handle, data, cfg, steps)
        for name in ("edit", "loc", "alpha"):
            run.history(f"{name}", [h[name] for h in hist])
        k = max(1, steps // 10)
        first, last = (
            {n: sum(h[n] for h in part) / len(part) for n in ("edit", "loc", "loss")}
            for part in (hist[:k], hist[-k:])
        )
        run.log(first=first, last=last, alpha=editor.alpha.tolist())
        progress.say(f"writing the editor -> {out}")
        path = editor.save(out, config=cfg.to_dict(), steps=steps, facts=str(facts),
                           model=_name(model))  # fmt: skip
        _wrote(run, path)
    return TrainedEditor(Path(path), steps, len(data), first, last, run.path)
