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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm import registry
from lfm.access import Access
from lfm.errors import LfmError
from lfm.pipeline.probe import Interface, probe

MEASURED = Path(__file__).with_name("measured.json")

# What each task asks of a method: its area and, within it, the shapes that do the job.
TASKS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "classify": ("tuning", ("tuner",), "adapt the model to a classification data set"),
    "edit": ("edit", ("editor",), "change facts the model states"),
    "merge": ("reuse", ("kernel", "aligner"), "combine several fine-tuned models into one"),
    "ensemble": ("reuse", ("ensemble",), "combine the answers of several models"),
    "distill": ("distill", ("loss", "distiller"), "train a small student from the model"),
    "meta": ("meta", ("learner",), "learn to learn new tasks from few examples"),
}


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


@dataclass(frozen=True)
class Plan:
    interface: Interface
    task: str | None
    entries: list[Entry]

    @property
    def runnable(self) -> list[Entry]:
        return [e for e in self.entries if e.runnable]

    def to_dict(self) -> dict[str, Any]:
        return {
            "interface": self.interface.to_dict(),
            "task": self.task,
            "methods": [
                {"method": e.key, "branch": e.branch, "needs": e.needs.name,
                 "runnable": e.runnable, "why": e.why, "figures": e.figures}
                for e in self.entries
            ],
        }  # fmt: skip


def record(method: str, score: float, summary: str, command: str, path: Path | None = None,
           **figures: Any) -> None:  # fmt: skip
    """Write (or replace) a method's measured row; benchmarks call this with `--record`.

    Args:
        method: the registry key (`edit/rome`).
        score: what `--task` orders by, higher is better (the edit Score, an accuracy ...).
        summary: one short line for `lfm plan` (e.g. `Score 94.6, 8.7 CPU-s per edit`).
        command: the benchmark command that measured it.
        figures: more numbers (e.g. `cpu_s_per_call`, `peak_mib`, `calls`), kept as they are.
    """
    path = path or MEASURED
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {"rows": []}
    rows = [r for r in data.get("rows", []) if r.get("method") != method]
    rows.append(
        {"method": method, "score": score, "summary": summary, "command": command, **figures}
    )
    from lfm.core.io import write_json

    write_json(path, {"note": "written by the benchmarks (--record); read by `lfm plan --task`",
                      "rows": sorted(rows, key=lambda r: r["method"])})  # fmt: skip


def measured(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The benchmark figures by method key (empty when no benchmark recorded any)."""
    try:
        data = json.loads((path or MEASURED).read_text())
    except (OSError, ValueError):
        return {}
    return {row["method"]: row for row in data.get("rows", []) if "method" in row}


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


def model_kinds(spec: registry.MethodSpec) -> tuple[str, ...] | None:
    """The kinds of model `spec` works on (None: any)."""
    kinds = spec.extras.get("models") or MODEL_KINDS.get(spec.key)
    return tuple(kinds) if kinds else MODEL_KINDS.get(f"{spec.area}/*")


def _model_ok(spec: registry.MethodSpec, interface: Interface) -> str:
    """Why the method cannot use this kind of model ("" when it can, or when unknown)."""
    kinds: Sequence[str] | None = model_kinds(spec)
    if not kinds or interface.model == "unknown" or interface.model in kinds:
        return ""
    return f"works on {' or '.join(kinds)} models, the target is a {interface.model}"


def _entry(spec: registry.MethodSpec, interface: Interface, figures: dict[str, Any]) -> Entry:
    why = ""
    if spec.access > interface.access:
        why = f"needs {spec.access.name}, the target gives {interface.access.name}"
    why = why or _model_ok(spec, interface)
    return Entry(spec.key, spec.area, spec.branch, spec.access, not why, why, figures)


def _rank(entry: Entry) -> tuple[int, float]:
    score = entry.figures.get("score")
    return (0 if entry.runnable else 1, -float(score) if isinstance(score, int | float) else 1e9)


def plan(target: str | Interface, task: str | None = None, api_key: str | None = None) -> Plan:
    """Place every registered method against what `target` exposes.

    Args:
        target: an asset name, a local model folder, adapter folder or weights file, a URL of a
            served model (lfm's or any OpenAI-compatible server), or an `Interface` already probed.
        task: one of `TASKS` (`classify`, `edit`, `merge`, `ensemble`, `distill`, `meta`): keep
            the methods for it, runnable first, ordered by their measured score.
        api_key: the served model's key.
    """
    if task is not None and task not in TASKS:
        raise LfmError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    interface = target if isinstance(target, Interface) else probe(target, api_key)
    figures = measured()
    specs = registry.methods()
    if task is not None:
        area, shapes, _ = TASKS[task]
        specs = [s for s in specs if s.area == area and s.shape.name in shapes]
    entries = [_entry(s, interface, figures.get(s.key, {})) for s in specs]
    if task is not None:
        entries.sort(key=_rank)
    return Plan(interface, task, entries)
