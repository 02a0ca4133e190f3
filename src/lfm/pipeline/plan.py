"""`lfm plan`: what can be learnt from a model through the interface it exposes.

    plan("smollm2-135m")                          # white-box: every method
    plan("http://127.0.0.1:8000")                 # a served model: what its level allows
    plan("http://127.0.0.1:8000", task="edit")    # the editing methods that fit, best first

The target is probed (`probe.py`), then every registered method is placed by area and survey
branch: runnable, or refused with the level it needs against the level found (or the kind of model
it needs). With a task, only the methods for that task are kept and ordered by what the
benchmarks measured: the figures come from `measured.json`, which the benchmark scripts write
(`--record`), never typed by hand; a method not measured comes last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lfm import registry
from lfm.access import Access
from lfm.errors import LfmError, did_you_mean
from lfm.pipeline.probe import Interface, probe

if TYPE_CHECKING:
    from lfm.core.measure import Measured

MEASURED = Path(__file__).with_name("measured.json")


@dataclass(frozen=True)
class Task:
    """What a task asks of a method, and the unit its cost is counted in."""

    area: str
    shapes: tuple[str, ...]  # the shapes of the area that do the job
    description: str
    unit: str  # what `size` counts: facts edited, training steps, models merged ...
    size: int  # the size estimated when none is given


TASKS: dict[str, Task] = {
    "classify": Task("tuning", ("tuner",), "adapt the model to a classification data set",
                     "step", 100),
    "edit": Task("edit", ("editor",), "change facts the model states", "fact", 10),
    "merge": Task("reuse", ("kernel", "aligner"), "combine several fine-tuned models into one",
                  "model", 2),
    "ensemble": Task("reuse", ("ensemble",), "combine the answers of several models",
                     "example", 100),
    "distill": Task("distill", ("loss", "distiller"), "train a small student from the model",
                    "step", 1000),
    "meta": Task("meta", ("learner",), "learn to learn new tasks from few examples",
                 "meta-update", 1000),
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One method against the interface found."""

    key: str
    area: str
    branch: str
    needs: Access
    runnable: bool
    why: str = ""  # the reason it cannot run, in one line
    figures: dict[str, Any] = field(default_factory=dict)  # measured, with the command
    estimate: dict[str, Any] = field(default_factory=dict)  # cost of a run of the task's size


@dataclass(frozen=True)
class Plan:
    interface: Interface
    task: str | None
    entries: list[Entry]
    size: int | None = None  # the task's size the estimates are for (in `TASKS[task].unit`)

    @property
    def runnable(self) -> list[Entry]:
        return [e for e in self.entries if e.runnable]

    def to_dict(self) -> dict[str, Any]:
        return {
            "interface": self.interface.to_dict(),
            "task": self.task,
            "size": self.size,
            "methods": [
                {"method": e.key, "branch": e.branch, "needs": e.needs.name,
                 "runnable": e.runnable, "why": e.why, "figures": e.figures,
                 "estimate": e.estimate}
                for e in self.entries
            ],
        }  # fmt: skip


def record(method: str, score: float, summary: str, command: str, *, model: str,
           unit: str, units: int, cost: Measured | None = None, params: int | None = None,
           path: Path | None = None, **figures: Any) -> None:  # fmt: skip
    """Write (or replace) a method's measured row on `model`; benchmarks call this (`--record`).

    Args:
        method: the registry key (`edit/rome`).
        score: what `--task` orders by, higher is better (the edit Score, an accuracy ...).
        summary: one short line for `lfm plan` (e.g. `Score 94.6, 8.7 CPU-s per fact`).
        command: the benchmark command that measured it.
        model: the model it was measured on (an asset name); one row per method and model.
        unit: what `units` counts (`fact`, `step`, `model` ...): the figures are divided by it.
        units: how many units the measured run did.
        cost: what the run cost (`Meter`); kept per unit, the peak memory as it is.
        params: parameters of the model measured on: estimates for another model scale by it.
        figures: more numbers (e.g. `efficacy`), kept as they are.
    """
    if units < 1:
        raise LfmError(f"record {method}: units must be >= 1, not {units}")
    path = path or MEASURED
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"rows": []}
    row: dict[str, Any] = {"method": method, "model": model, "score": score, "summary": summary,
                           "command": command, "unit": unit, "units": units, "params": params}  # fmt: skip
    if cost is not None:
        row |= {"cpu_s_per_unit": cost.cpu_s / units, "wall_s_per_unit": cost.wall_s / units,
                "calls_per_unit": cost.calls / units, "peak_mib": cost.peak_mib}  # fmt: skip
    keep = [r for r in data.get("rows", []) if (r.get("method"), r.get("model")) != (method, model)]
    from lfm.core.io import write_json

    write_json(path, {"note": "written by the benchmarks (--record); read by `lfm plan --task`",
                      "rows": sorted([*keep, {**row, **figures}],
                                     key=lambda r: (r["method"], str(r.get("model"))))})  # fmt: skip


def measured(path: Path | None = None, model: str | None = None) -> dict[str, dict[str, Any]]:
    """The benchmark figures by method key: the row measured on `model` where there is one, else
    the row of the largest model measured (empty when no benchmark recorded any)."""
    try:
        data = json.loads((path or MEASURED).read_text())
    except (OSError, ValueError):
        return {}
    best: dict[str, dict[str, Any]] = {}
    for row in data.get("rows", []):
        key = row.get("method")
        if not key:
            continue
        old = best.get(key)
        if old is None or _prefer(row, old, model):
            best[key] = row
    return best


def _prefer(row: dict[str, Any], old: dict[str, Any], model: str | None) -> bool:
    if (row.get("model") == model) != (old.get("model") == model):
        return row.get("model") == model
    return (row.get("params") or 0) > (old.get("params") or 0)


SCALE_RANGE = 10.0  # figures are scaled to another model only within this ratio of sizes


def estimate(row: dict[str, Any], size: int, interface: Interface) -> dict[str, Any]:
    """The cost of `size` units through `interface`, from a measured row: calls per unit times
    the size; CPU seconds and peak memory scaled by the ratio of parameter counts when both are
    known and within `SCALE_RANGE` of each other (the same model: 1). Otherwise the figures are
    those measured, and `scale` is None: a ratio from a toy model to a real one says nothing."""
    if "cpu_s_per_unit" not in row:
        return {}
    same = row.get("model") in (interface.target, interface.facts.get("model"))
    ours, theirs = interface.facts.get("params"), row.get("params")
    ratio = ours / theirs if ours and theirs else None
    near = ratio is not None and 1 / SCALE_RANGE <= ratio <= SCALE_RANGE
    scale = 1.0 if same else ratio if near else None
    k = scale or 1.0
    return {
        "size": size,
        "unit": row.get("unit"),
        "calls": round(row["calls_per_unit"] * size),
        "cpu_s": row["cpu_s_per_unit"] * size * k,
        "peak_mib": row["peak_mib"] * k,
        "from": row.get("model"),
        "from_params": theirs,
        "scaled": scale is not None and not same,
        "scale": scale,
    }


# The kinds of model a method works on, where not every kind: a method's own `models` extra
# first, then its key, then its area (`*`). Kinds are those `probe` reports.
LM, VISION = ("causal-lm",), ("vision",)
MODEL_KINDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(["tuning/bbt", "tuning/prompt_search", "tuning/knn_lm", "tuning/replug",
                     "tuning/mezo", "distill/lm_student", "distill/seq_kd",
                     "distill/step_by_step"], LM),
    **dict.fromkeys(["distill/deep_inversion", "distill/dafl", "distill/dfad", "distill/dfme",
                     "reuse/rebasin"], VISION),
    "tuning/*": ("causal-lm", "encoder"), "edit/*": LM, "meta/*": VISION,
}  # fmt: skip


# SCORES methods that read whole next-token (or class) distributions, which a server sending
# only its top-k log-probabilities (any OpenAI-style API, `lfm serve --top-k K`) cannot give.
# The others at SCORES read given continuations' log-probabilities or the top k themselves.
FULL_ROWS = frozenset([
    "reuse/ensemble_average", "tuning/replug", "distill/kd", "distill/reverse_kl", "distill/dist",
    "distill/skew_kl", "distill/dfme", "distill/uld", "meta/datafree_blackbox",
])  # fmt: skip


# ... and those that read the top k by token id, which only an lfm server sends
TOP_K_IDS = frozenset(["distill/topk_lm", "distill/gkd"])


def _rows_ok(spec: registry.MethodSpec | Listed, interface: Interface) -> str:
    """Why the method cannot run on a top-k interface ("" when it can)."""
    if spec.key in TOP_K_IDS and interface.kind == "openai server":
        return "needs the top k by token id (an lfm server); this server sends token strings"
    k = interface.facts.get("top_k")
    full = spec.extras.get("rows", "full" if spec.key in FULL_ROWS else "") == "full"
    if k is None or spec.access != Access.SCORES or not full:
        return ""
    return f"needs whole next-token distributions, the target sends its top {k}"


def model_kinds(spec: registry.MethodSpec | Listed) -> tuple[str, ...] | None:
    """The kinds of model `spec` works on (None: any)."""
    kinds = spec.extras.get("models") or MODEL_KINDS.get(spec.key)
    return tuple(kinds) if kinds else MODEL_KINDS.get(f"{spec.area}/*")


def _model_ok(spec: registry.MethodSpec | Listed, interface: Interface) -> str:
    """Why the method cannot use this kind of model ("" when it can, or when unknown)."""
    kinds: Sequence[str] | None = model_kinds(spec)
    if not kinds or interface.model == "unknown" or interface.model in kinds:
        return ""
    return f"works on {' or '.join(kinds)} models, the target is a {interface.model}"


def _entry(spec: registry.MethodSpec | Listed, interface: Interface, figures: dict[str, Any],
           size: int | None) -> Entry:  # fmt: skip
    why = ""
    if spec.access > interface.access:
        why = f"needs {spec.access.name}, the target gives {interface.access.name}"
    why = why or _model_ok(spec, interface) or _rows_ok(spec, interface)
    cost = estimate(figures, size, interface) if size and figures else {}
    return Entry(spec.key, spec.area, spec.branch, spec.access, not why, why, figures, cost)


@dataclass(frozen=True)
class _Shape:
    name: str


@dataclass(frozen=True)
class Listed:
    """A method as a catalogue lists it: what `plan` reads of a `registry.MethodSpec` (its key,
    area, branch, access, shape and the extras `rows` and `models`), without importing it."""

    key: str
    area: str
    branch: str
    access: Access
    shape: _Shape
    extras: dict[str, Any]


def listed(methods: Sequence[dict[str, Any]]) -> list[Listed]:
    """`Listed` methods from catalogue rows ({area, name, branch, access, shape[, rows, models]}:
    `lfm.cli.catalogue`, which `lfm plan` reads so that it imports no method module)."""
    return [
        Listed(
            f"{m['area']}/{m['name']}",
            m["area"],
            m["branch"],
            Access[m["access"]],
            _Shape(m["shape"]),
            {k: m[k] for k in ("rows", "models") if k in m},
        )
        for m in methods
    ]


def _rank(entry: Entry) -> tuple[int, float]:
    score = entry.figures.get("score")
    return (0 if entry.runnable else 1, -float(score) if isinstance(score, int | float) else 1e9)


def plan(target: str | Interface, task: str | None = None, api_key: str | None = None,
         size: int | None = None, methods: Sequence[Any] | None = None) -> Plan:  # fmt: skip
    """Place every registered method against what `target` exposes.

    Args:
        target: an asset name, a local model folder, adapter folder or weights file, a URL of a
            served model (lfm's or any OpenAI-compatible server), or an `Interface` already probed.
        task: one of `TASKS` (`classify`, `edit`, `merge`, `ensemble`, `distill`, `meta`): keep
            the methods for it, runnable first, ordered by their measured score, each with an
            estimate of its calls, CPU time and peak memory from the benchmark's figures.
        api_key: the served model's key.
        size: how much work the estimate is for, in the task's unit (facts to edit, training
            steps, models to merge ...); default: the task's `size`.
        methods: the methods to place (`registry.MethodSpec`s, or `Listed` rows of a catalogue);
            default: every registered method (which imports every area).
    """
    if task is not None and task not in TASKS:
        hint = did_you_mean(task, TASKS) or f"; choose one of {', '.join(TASKS)}"
        raise LfmError(f"unknown task {task!r}{hint}")
    if size is not None and task is None:
        raise LfmError("a size needs a task: the size counts the task's unit (facts, steps ...)")
    if size is not None and size < 1:
        raise LfmError(f"the size must be >= 1, not {size}")
    interface = target if isinstance(target, Interface) else probe(target, api_key)
    if task is not None and interface.kind == "asset" and not interface.facts.get("params"):
        from lfm.pipeline.probe import asset_params

        facts = {**interface.facts, "params": asset_params(interface.target)}
        interface = replace(interface, facts=facts)  # estimates scale by it
    specs = list(methods) if methods is not None else registry.methods()
    if task is not None:
        t = TASKS[task]
        specs = [s for s in specs if s.area == t.area and s.shape.name in t.shapes]
        size = size or t.size
    model = interface.target if interface.kind == "asset" else interface.facts.get("model")
    figures = measured(model=model)
    entries = [_entry(s, interface, figures.get(s.key, {}), size) for s in specs]
    if task is not None:
        entries.sort(key=_rank)
    return Plan(interface, task, entries, size)
