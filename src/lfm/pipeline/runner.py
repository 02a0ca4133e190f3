"""`lfm run pipeline.yaml`: validate a pipeline whole, then run its steps with lineage.

Each step runs in its own run directory, `<root>/<pipeline>/<step>-<fingerprint>/`, whose
manifest holds the step's resolved definition, the SHA-256 of every input file and the ids of the
runs that made its inputs. The fingerprint hashes the step's definition with its inputs' hashes,
so rerunning a pipeline skips every step whose definition and inputs match a finished run and
reruns a changed step and everything downstream of it. A step killed half-way left no output
(outputs are renamed into place only when complete) and is run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lfm.access import Access
from lfm.core.io import atomic_path, write_json
from lfm.core.runs import Run, read_manifest
from lfm.errors import ConfigError, LfmError
from lfm.pipeline import data as D
from lfm.pipeline import spec as S
from lfm.pipeline.artifacts import Artifact
from lfm.pipeline.steps import Context, Kind, kind_of


@dataclass
class StepOutcome:
    name: str
    run_id: str
    artifact: Artifact | None
    metrics: dict[str, Any]
    skipped: bool
    seconds: float


@dataclass
class PipelineResult:
    name: str
    folder: Path
    steps: list[StepOutcome] = field(default_factory=list)

    def table(self) -> dict[str, dict[str, Any]]:
        """Evaluation figures: {evaluation step: {metric: value}}, in step order."""
        return {s.name: s.metrics for s in self.steps if s.artifact is None and s.metrics}

    def markdown(self) -> str:
        rows = self.table()
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r))  # first-seen order
        lines = ["| step | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for name, r in rows.items():
            cells = [_fmt(r.get(m)) for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


# ------------------------------------------------------------------------------------------
# Validation: every problem, before any weight is loaded.


def _source(ref: str, api_key: str | None) -> Artifact | str:
    """The artifact a non-step reference names, or why it names none."""
    from lfm.assets.models import MODELS
    from lfm.pipeline.probe import probe

    if ref.startswith(("http://", "https://")):
        try:
            found = probe(ref, api_key)
        except LfmError as e:
            return str(e)
        return Artifact("url", ref, found.access)
    if ref in MODELS:
        return Artifact("classifier" if MODELS[ref].kind == "vision" else "lm", ref)
    path = Path(ref)
    if (path / "classifier.json").exists():
        return Artifact("classifier", ref)
    if (path / "result.json").exists():
        return Artifact("tuned", ref)
    if (path / "config.json").exists():
        return Artifact("lm", ref)
    if path.is_file() and path.suffix == ".safetensors":
        return _tagged(path)
    return f"{ref!r} is no earlier step, asset, model folder or URL"


def _tagged(path: Path) -> Artifact | str:
    """An edit patch or a statistics file, by its format tag (anything else is refused)."""
    from lfm.core.io import read_meta
    from lfm.edit.patch import FORMAT as PATCH
    from lfm.reuse.stats import FORMAT as STATS

    try:
        fmt = read_meta(path).get("format")
    except LfmError as e:
        return str(e)
    kinds = {PATCH: "patch", STATS: "stats"}
    if fmt not in kinds:
        return f"{path} is neither an edit patch nor a statistics file (format {fmt!r})"
    return Artifact(kinds[fmt], str(path))


def _order(steps: list[S.StepSpec], names: set[str]) -> tuple[list[S.StepSpec], list[str]]:
    """Steps in dependency order, and the cycles found (each as one line)."""
    by = {s.name: s for s in steps}
    deps = {s.name: [r for refs in s.refs().values() for r in refs if r in names] for s in steps}
    order: list[S.StepSpec] = []
    state: dict[str, int] = {}
    problems: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            problems.append(f"step {name!r}: its inputs form a cycle: {' -> '.join(cycle)}")
            return
        state[name] = 1
        for d in deps[name]:
            visit(d, [*path, name])
        state[name] = 2
        order.append(by[name])

    for s in steps:
        visit(s.name, [])
    return order, problems


def validate(pipe: S.PipelineSpec, api_key: str | None = None) -> list[S.StepSpec]:
    """The steps in the order they run; a one-line `ConfigError` listing every problem."""
    return _validate(pipe, api_key, {})[0]


Sources = dict[str, "Artifact | str"]  # a reference that is no step -> what it names, or why not


def _validate(
    pipe: S.PipelineSpec, api_key: str | None, sources: Sources
) -> tuple[list[S.StepSpec], dict[str, Kind]]:
    """`validate`, also giving each step's kind and filling `sources` (each probed once)."""
    problems: list[str] = []
    names = [s.name for s in pipe.steps]
    problems += [
        f"step {n!r}: the name is used twice"
        for n in sorted({n for n in names if names.count(n) > 1})
    ]
    problems += [
        f"step {n!r}: a name is letters, digits, _ and -" for n in names if not S.NAME.match(n)
    ]
    kinds: dict[str, Kind] = {}
    for step in pipe.steps:
        try:
            kinds[step.name] = kind_of(step.run)
        except LfmError as e:
            problems.append(f"step {step.name!r}: {e}")
    order, cycles = _order(pipe.steps, set(names))
    problems += cycles
    made: dict[str, str] = {}  # step -> the artifact kind it makes
    for step in order:
        kind = kinds.get(step.name)
        if kind is None:
            continue
        problems += _check_step(step, kind, made, api_key, sources)
        made[step.name] = kind.output
    if problems:
        raise ConfigError(f"pipeline {pipe.name}: " + "; ".join(problems))
    return order, kinds


def _check_step(
    step: S.StepSpec, kind: Kind, made: dict[str, str], api_key: str | None, sources: Sources
) -> list[str]:
    out: list[str] = []
    refs = step.refs()
    allowed = {**kind.needs, **kind.optional}
    for key in kind.needs:
        if key not in refs:
            out.append(f"step {step.name!r}: {kind.name} needs `{key}`")
    for key, values in refs.items():
        if key not in allowed:
            out.append(f"step {step.name!r}: {kind.name} takes no `{key}`")
            continue
        for ref in values:
            got = _kind_of_ref(ref, made, api_key, sources)
            if isinstance(got, str):
                out.append(f"step {step.name!r}: {key}: {got}")
                continue
            art_kind, level = got
            if art_kind not in allowed[key]:
                out.append(
                    f"step {step.name!r}: {key} {ref!r} is a {art_kind}, {kind.name} takes {' or '.join(allowed[key])}"
                )
            elif level < kind.access:
                out.append(
                    f"step {step.name!r}: {kind.name} needs {kind.access.name} access, but {ref!r} gives only {level.name}"
                )
    fields = {"data": step.data, "requests": step.requests, "student": step.student,
              "config": step.config, "train": step.train}  # fmt: skip
    for key, value in fields.items():
        if value and key != "data" and key not in kind.extra:
            out.append(f"step {step.name!r}: {kind.name} takes no `{key}`")
    if kind.data is not None and (kind.data_required or step.data is not None):
        out += D.check(kind.data, step.data, step.name)
    elif step.data:
        out.append(f"step {step.name!r}: {kind.name} takes no `data`")
    return out + kind.check(step)


def _kind_of_ref(
    ref: str, made: dict[str, str], api_key: str | None, sources: Sources
) -> tuple[str, Access] | str:
    if ref in made:
        return made[ref], Access.WEIGHTS
    if ref not in sources:
        sources[ref] = _source(ref, api_key)
    src = sources[ref]
    return src if isinstance(src, str) else (src.kind, src.access)


# ------------------------------------------------------------------------------------------
# Running.


def fingerprint(step: S.StepSpec, inputs: dict[str, list[Artifact]]) -> str:
    """SHA-256 of the step's definition and its inputs' content."""
    h = hashlib.sha256(json.dumps(step.model_dump(mode="json"), sort_keys=True).encode())
    for key in sorted(inputs):
        for a in inputs[key]:
            h.update(f"{key}:{a.kind}:{a.digest()}\n".encode())
    return h.hexdigest()


def _finished(folder: Path) -> dict[str, Any] | None:
    try:
        m = read_manifest(folder)
    except LfmError:
        return None
    return m if m.get("status") == "done" else None


def run_pipeline(
    pipeline: str | Path | S.PipelineSpec,
    root: str | Path = "runs",
    api_key: str | None = None,
    log: Any = print,
) -> PipelineResult:
    """Validate, then run a pipeline (a YAML file or a parsed spec); finished steps are skipped.

    Returns the outcome of each step and the evaluation table; `<root>/<name>/pipeline.json`
    and `table.md` record the last run.
    """
    pipe = pipeline if isinstance(pipeline, S.PipelineSpec) else S.load(pipeline)
    sources: Sources = {}
    order, kinds = _validate(pipe, api_key, sources)
    folder = Path(root) / pipe.name
    result = PipelineResult(pipe.name, folder)
    made: dict[str, StepOutcome] = {}
    for i, step in enumerate(order, 1):
        kind = kinds[step.name]
        inputs = _inputs(step, made, sources)
        fp = fingerprint(step, inputs)
        run_dir = folder / f"{step.name}-{fp[:12]}"
        done = _finished(run_dir)
        t0 = time.perf_counter()
        if done is not None:
            outcome = _reuse(step, kind, run_dir, done)
            log(f"[{i}/{len(order)}] {step.name}: finished before, skipped ({run_dir.name})")
        else:
            log(f"[{i}/{len(order)}] {step.name}: {step.run} ...")
            outcome = _execute(step, kind, inputs, run_dir, fp, made)
        outcome.seconds = time.perf_counter() - t0
        made[step.name] = outcome
        result.steps.append(outcome)
    _record(result)
    return result


def _inputs(
    step: S.StepSpec, made: dict[str, StepOutcome], sources: Sources
) -> dict[str, list[Artifact]]:
    """The artifacts a step reads: earlier steps' outputs, or the sources validation resolved
    (which also made sure that none is an evaluation or names nothing)."""
    return {
        key: [made[r].artifact if r in made else sources[r] for r in refs]  # type: ignore[misc]
        for key, refs in step.refs().items()
    }


def _execute(
    step: S.StepSpec,
    kind: Kind,
    inputs: dict[str, list[Artifact]],
    run_dir: Path,
    fp: str,
    made: dict[str, StepOutcome],
) -> StepOutcome:
    files = {f"{k}{i}": a.path for k, arts in inputs.items() for i, a in enumerate(arts)
             if a.kind != "url" and Path(a.path).exists()}  # fmt: skip
    parents = sorted({made[r].run_id for refs in step.refs().values() for r in refs if r in made})
    config = {"fingerprint": fp, **step.model_dump(mode="json")}
    # A killed run of this step left `.output.pid<N>.*.tmp`: `atomic_path` sweeps it (only if
    # process N is gone, so a run still writing is never disturbed).
    with Run(step.name, config, inputs=files, path=run_dir, parents=parents) as run:
        torch.manual_seed(step.seed)
        with atomic_path(run_dir / "output") as tmp:
            tmp.mkdir()
            ctx = Context(step, inputs, tmp)
            rel = kind.execute(ctx)
        artifact = None if kind.evaluates else Artifact(kind.output, str(run_dir / "output" / rel))
        run.manifest["artifact"] = (
            None if artifact is None else {"kind": artifact.kind, "path": f"output/{rel}"}
        )
        run.log(**ctx.metrics)
    return StepOutcome(step.name, run_dir.name, artifact, dict(ctx.metrics), False, 0.0)


def _reuse(step: S.StepSpec, kind: Kind, run_dir: Path, manifest: dict[str, Any]) -> StepOutcome:
    rec = manifest.get("artifact")
    artifact = None if rec is None else Artifact(rec["kind"], str(run_dir / rec["path"]))
    return StepOutcome(
        step.name, run_dir.name, artifact, dict(manifest.get("metrics", {})), True, 0.0
    )


def _record(result: PipelineResult) -> None:
    result.folder.mkdir(parents=True, exist_ok=True)
    steps = [{"name": s.name, "run": s.run_id, "skipped": s.skipped, "seconds": round(s.seconds, 2),
              "metrics": s.metrics} for s in result.steps]  # fmt: skip
    write_json(
        result.folder / "pipeline.json",
        {"name": result.name, "steps": steps, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )
    with atomic_path(result.folder / "table.md") as tmp:
        tmp.write_text(result.markdown() + "\n")
