"""Pipelines are validated whole before any model loads: each problem is one line naming its step."""

from __future__ import annotations

import pytest

from lfm.errors import ConfigError
from lfm.pipeline import spec as S
from lfm.pipeline.runner import validate

GOOD = {
    "name": "p",
    "steps": [
        {"name": "base", "run": "train_classifier", "student": {"arch": "tiny_mlp", "d_in": 64, "n_out": 10},
         "data": {"dataset": "digits"}, "train": {"steps": 2}},
        {"name": "a", "run": "train_classifier", "base": "base", "data": {"dataset": "digits", "classes": [0, 1]}},
        {"name": "b", "run": "train_classifier", "base": "base", "data": {"dataset": "digits", "classes": [2, 3]}},
        {"name": "merged", "run": "reuse/ties", "models": ["a", "b"], "base": "base"},
        {"name": "student", "run": "distill/kd", "teacher": "merged", "data": {"dataset": "digits"},
         "student": {"arch": "tiny_mlp", "d_in": 64, "n_out": 10}},
        {"name": "acc", "run": "evaluate_accuracy", "models": ["a", "merged"], "data": {"dataset": "digits"}},
    ],
}  # fmt: skip


def _with(**changes):
    steps = [dict(s) for s in GOOD["steps"]]
    for name, patch in changes.items():
        i = next(k for k, s in enumerate(steps) if s["name"] == name)
        steps[i] = {k: v for k, v in {**steps[i], **patch}.items() if v is not None}
    return {"name": "p", "steps": steps}


def _problems(data) -> str:
    with pytest.raises(ConfigError) as e:
        validate(S.parse(data))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """Validation must fail before any weight is read."""
    import lfm.pipeline.artifacts as A

    def refuse(*a, **k):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(A, "load_classifier", refuse)
    monkeypatch.setattr("lfm.assets.load_model", refuse)


def test_a_good_pipeline_validates_in_dependency_order():
    order = validate(S.parse(GOOD))
    assert [s.name for s in order] == ["base", "a", "b", "merged", "student", "acc"]


def test_unknown_method_or_step_names_the_step_and_a_close_name():
    msg = _problems(_with(merged={"run": "reuse/tise"}))
    assert "step 'merged'" in msg and "did you mean 'ties'" in msg
    msg = _problems(_with(acc={"run": "evaluate_acuracy"}))
    assert "step 'acc'" in msg and "did you mean 'evaluate_accuracy'" in msg


def test_wrong_keys_are_refused_at_every_level():
    assert "step 'a': lr: Extra inputs are not permitted" in _problems(_with(a={"lr": 1}))
    assert "step 'merged': config: TiesConfig: desnity" in _problems(
        _with(merged={"config": {"desnity": 0.5}})
    )
    assert "step 'a': train: TrainConfig: stepz" in _problems(_with(a={"train": {"stepz": 3}}))
    assert "step 'acc': data.clases" in _problems(
        _with(acc={"data": {"dataset": "digits", "clases": [1]}})
    )
    assert "step 'merged': config: TiesConfig: density" in _problems(
        _with(merged={"config": {"density": 2}})
    )


def test_missing_inputs_and_inputs_of_the_wrong_kind():
    assert "step 'merged': reuse/ties needs `base`" in _problems(_with(merged={"base": None}))
    assert "step 'student': distill/kd needs `teacher`" in _problems(
        _with(student={"teacher": None})
    )
    msg = _problems(_with(merged={"models": ["a", "acc"]}))
    assert "models 'acc' is a metrics" in msg
    msg = _problems(_with(merged={"models": ["a", "nowhere"]}))
    assert "'nowhere' is no earlier step, asset, model folder or URL" in msg
    assert "takes no `requests`" in _problems(_with(a={"requests": [{"prompt": "x"}]}))


def test_cycles_and_duplicate_names():
    msg = _problems(_with(base={"run": "train_classifier", "base": "merged", "student": None}))
    assert "form a cycle" in msg and "base -> " in msg
    data = _with()
    data["steps"].append(dict(data["steps"][0]))
    assert "step 'base': the name is used twice" in _problems(data)


def test_a_step_asking_for_more_access_than_its_input_gives(monkeypatch):
    from lfm.access import Access
    from lfm.pipeline import runner
    from lfm.pipeline.artifacts import Artifact

    real = runner._source
    monkeypatch.setattr(
        runner, "_source",
        lambda ref, key: Artifact("classifier", ref, Access.TEXT) if ref.startswith("http") else real(ref, key),
    )  # fmt: skip
    msg = _problems(_with(student={"teacher": "http://127.0.0.1:9/v1"}))
    assert (
        "step 'student': distill/kd needs SCORES access, but 'http://127.0.0.1:9/v1' gives only TEXT"
        in msg
    )


def test_every_problem_is_reported_at_once():
    msg = _problems(_with(a={"train": {"x": 1}}, merged={"run": "reuse/nope"}, acc={"data": None}))
    assert msg.count("step '") >= 3


def test_schema_errors_name_the_step():
    with pytest.raises(ConfigError, match="step 'a': bogus: Extra inputs"):
        S.parse(_with(a={"bogus": 1}))
    with pytest.raises(ConfigError, match="must be a mapping"):
        S.parse([1, 2])


def test_a_tensor_file_is_taken_by_its_format_tag(tmp_path):
    import torch

    from lfm.core.io import save_tensors

    odd = save_tensors(tmp_path / "odd.safetensors", {"w": torch.zeros(1)}, "lfm.classifier/1")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    msg = _problems(
        _with(merged={"stats": [str(odd), str(bad)], "run": "reuse/regmean", "base": None})
    )
    assert "is neither an edit patch nor a statistics file" in msg and "cannot read" in msg
