"""A merge plan is checked whole before one weight is read: schema, method, parameters, paths,
every model's config.json and every tensor's name, shape and dtype from the safetensors headers.
Every problem is found at once, one line each (one `error:` line each from the CLI)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from lfm.cli.reuse import app
from lfm.reuse import engine
from lfm.reuse.plan import PlanError, check_plan
from lfm.reuse.recipes import merge_plan

CONFIG = {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 1, "vocab_size": 3}


def _model(folder, tensors, **config):
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**CONFIG, **config}))
    return folder.name


def _good(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def sd():
        return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}

    return [_model(tmp_path / n, sd()) for n in ("base", "a", "b")]


@pytest.fixture
def reads(monkeypatch):
    """Counts the tensors read from disk (the headers are not counted)."""
    count = {"n": 0}
    get = engine.SafetensorsReader.get

    def counted(self, name):
        count["n"] += 1
        return get(self, name)

    monkeypatch.setattr(engine.SafetensorsReader, "get", counted)
    return count


def _plan(tmp_path, data, name="plan.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_schema_problem_of_a_plan_is_reported_at_once(tmp_path, reads):
    _good(tmp_path)
    plan = _plan(tmp_path, {
        "method": "ties", "base": "base", "on_missing": "sometimes",
        "parameters": {"density": 0.5, "densty": 0.2},
        "models": [{"path": "a", "weight": "abc"}, {"path": "nowhere"}, {"path": "b", "wieght": 2}],
    })  # fmt: skip
    with pytest.raises(PlanError) as info:
        merge_plan(plan, tmp_path / "out", progress=False, root=tmp_path / "runs")
    got = info.value.problems
    assert len(got) == 5, got
    expected = ["'densty'", "weight of model 0 must be a number", "model 1: no such file",
                "'wieght'", "on_missing must be error or skip"]  # fmt: skip
    assert all(any(e in line for line in got) for e in expected), got
    assert reads["n"] == 0 and not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_header_problems_of_every_model_are_reported_at_once_without_reading_a_weight(
    tmp_path, reads
):
    _good(tmp_path)
    _model(tmp_path / "c", {"w": torch.zeros(3, 4)})  # no "b"
    _model(tmp_path / "d", {"w": torch.zeros(4, 4), "b": torch.zeros(4)})  # w's shape differs
    _model(tmp_path / "e", {"w": torch.zeros(3, 4), "b": torch.zeros(4), "extra": torch.zeros(1)})
    _model(tmp_path / "f", {"w": torch.zeros(3, 4), "b": torch.zeros(4)}, num_hidden_layers=2)
    _model(tmp_path / "g", {"w": torch.zeros(3, 4, dtype=torch.uint8), "b": torch.zeros(4)})
    plan = _plan(tmp_path, {"method": "task_arithmetic", "base": "base",
                            "models": ["a", "c", "d", "e", "f", "g"]})  # fmt: skip
    with pytest.raises(PlanError) as info:
        check_plan(plan)
    got = "\n".join(info.value.problems)
    assert "b missing from model 1" in got  # c
    assert "w: [3, 4] in the template vs [4, 4] in model 2" in got  # d
    assert "extra in model 3 but not in the template" in got  # e
    assert "model 4" in got and "num_hidden_layers 2" in got  # f: its config
    assert "model 5 stores w as torch.uint8, where the template stores floats" in got  # g
    assert len(info.value.problems) == 5, got
    assert reads["n"] == 0


def test_the_cli_prints_one_error_line_per_problem_and_check_reads_nothing(tmp_path, reads):
    _good(tmp_path)
    _model(tmp_path / "d", {"w": torch.zeros(4, 4), "b": torch.zeros(4)})
    bad = _plan(tmp_path, {"method": "task_arithmetic", "base": "base",
                           "models": [{"path": "a", "weight": float("nan")}, "d"]})  # fmt: skip
    res = CliRunner().invoke(app, ["merge", str(bad), "-o", str(tmp_path / "out"), "-q",
                                   "--root", str(tmp_path / "runs")])  # fmt: skip
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 2, res.output
    assert all(line.startswith("error:") for line in lines)
    assert "finite number" in res.output and "[4, 4]" in res.output
    good = _plan(tmp_path, {"method": "task_arithmetic", "base": "base", "models": ["a", "b"]},
                 name="good.yaml")  # fmt: skip
    res = CliRunner().invoke(app, ["merge", str(good), "--check"])
    assert res.exit_code == 0 and "checks out (2 models" in res.output, res.output
    assert reads["n"] == 0 and not (tmp_path / "runs").exists()
    res = CliRunner().invoke(app, ["merge", str(good)])  # neither --out nor --check
    assert res.exit_code == 2 and "--out is required" in res.output
    # the same plan merges, reading each tensor of each model once
    res = CliRunner().invoke(app, ["merge", str(good), "-o", str(tmp_path / "out"), "-q",
                                   "--root", str(tmp_path / "runs")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert reads["n"] == 2 * 3  # two tensors, base and two models


def test_a_mergekit_file_reports_its_problems_at_once(tmp_path, reads):
    _good(tmp_path)
    plan = _plan(tmp_path, {
        "merge_method": "ties", "base_model": "base", "tokenizer_source": "base",
        "parameters": {"density": 0.5, "gamma": 0.1},
        "models": [{"model": "a", "parameters": {"weight": "x"}}, {"model": "nowhere"}],
    })  # fmt: skip
    with pytest.raises(PlanError) as info:
        check_plan(plan)
    got = "\n".join(info.value.problems)
    assert "tokenizer_source" in got and "'gamma'" in got and "must be a number" in got
    assert "no such file or folder" in got and len(info.value.problems) == 4, got
    assert reads["n"] == 0
