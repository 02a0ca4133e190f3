"""A pipeline file: named steps, each a registered method or a pipeline step, validated whole
before any weight is loaded.

    name: tune-merge-edit
    steps:
      - name: tune
        run: tuning/lora                  # a registered method ...
        model: smollm2-135m               # an asset, a folder, a URL, or an earlier step's name
        data: {dataset: bbc-news, shots: 4, max_chars: 300}
        train: {steps: 8, lr: 1.0e-3}
      - name: merged
        run: merge_adapter                # ... or a pipeline step (`lfm.pipeline.steps.STEPS`)
        model: tune
      - name: edit
        run: edit/rome
        model: merged
        requests: [{prompt: "The Eiffel Tower is located in the city of",
                    subject: "Eiffel Tower", target: "Rome"}]

`validate` reports every problem at once, each one line naming its step: an unknown method or
step, an unknown key (also inside `config` and `train`), a missing input, a reference to a step
that does not exist or comes later (a cycle), an input of the wrong kind, and a step asking for
more access than its input gives (a served model at SCORES cannot be edited with ROME).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lfm.errors import ConfigError, LfmError

Ref = str  # an earlier step's name, an asset name, a local path, or a URL
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class StepSpec(BaseModel):
    """One step. Which fields it needs depends on what it runs (see `lfm.pipeline.steps`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # unique in the pipeline: letters, digits, _ and -
    run: str  # `area/method` (a registered method) or a pipeline step such as `merge_adapter`
    model: Ref | None = None  # the model the step reads (a tuner's, editor's or evaluation's)
    models: list[Ref] | None = None  # the models a merge combines
    base: Ref | None = None  # the base model of a merge, or the model an expert starts from
    teacher: Ref | None = None  # a distiller's teacher
    patch: Ref | None = None  # an edit patch to apply
    stats: list[Ref] | None = None  # statistics files of a data-aware merge, one per model
    data: dict[str, Any] | None = None  # what data the step uses (see `lfm.pipeline.data`)
    requests: list[dict[str, str]] | None = None  # edit requests: prompt, subject, target
    student: dict[str, Any] | None = None  # a student architecture (`arch` and its options)
    config: dict[str, Any] = Field(default_factory=dict)  # the method's config
    train: dict[str, Any] = Field(default_factory=dict)  # the training loop's `TrainConfig`
    seed: int = 0  # seeds the step's data order and initialisation

    def refs(self) -> dict[str, list[Ref]]:
        """The step's model-like inputs by field (lists even for single inputs)."""
        out: dict[str, list[Ref]] = {}
        for key in ("model", "base", "teacher", "patch"):
            value = getattr(self, key)
            if value is not None:
                out[key] = [value]
        for key in ("models", "stats"):
            value = getattr(self, key)
            if value:
                out[key] = list(value)
        return out


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    steps: list[StepSpec]


def _where(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = data.get("steps") or []
        name = (
            steps[loc[1]].get("name")
            if loc[1] < len(steps) and isinstance(steps[loc[1]], dict)
            else None
        )
        rest = ".".join(map(str, loc[2:]))
        return f"step {name or loc[1]!r}: {rest}"
    return ".".join(map(str, loc)) or "<file>"


def parse(data: Any, source: str = "pipeline") -> PipelineSpec:
    """A pipeline from its mapping; every schema problem at once, one line each."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with `name` and `steps`")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as e:
        problems = [f"{_where(tuple(err['loc']), data)}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load(path: str | Path) -> PipelineSpec:
    """Read a pipeline YAML file (schema-checked; `validate` checks the rest)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LfmError(f"cannot read pipeline {path}: {e}") from None
    return parse(data, str(path))
