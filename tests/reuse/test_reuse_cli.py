"""`lfm reuse merge`, its recipe, and merge plans in lfm's and mergekit's YAML."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lfm.cli.reuse import app
from lfm.core.io import atomic_path
from lfm.core.runs import Run, path_sha256
from lfm.reuse import merge_state_dicts
from lfm.reuse.driver import MergeError
from lfm.reuse.plan import from_mergekit, load_plan
from lfm.reuse.recipes import merge_plan


@pytest.fixture
def files(merge_files):
    return merge_files


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_merge_lfm_plan(files):
    root, (base, a, b) = files
    plan = {
        "method": "ties", "base": "base.safetensors",
        "models": [{"path": "a.safetensors", "weight": 2.0}, "b.safetensors"],
        "parameters": {"density": "5e-1"},  # YAML reads 5e-1 as a string: coerced
    }  # fmt: skip
    result = CliRunner().invoke(app, ["merge", str(_write(root / "plan.yaml", plan)), "--out",
                                      str(root / "m"), "-q", "--root", str(root / "runs")])  # fmt: skip
    assert result.exit_code == 0, result.output
    got = load_file(root / "m" / "model.safetensors")
    want = merge_state_dicts("ties", base, [a, b], {"density": 0.5}, weights=[2.0, 1.0])
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def _one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (
        result.output
    )
    return lines[0]


def test_cli_reports_errors_in_one_line(files):
    root, _ = files
    runs = ["--root", str(root / "runs")]
    plan = {
        "method": "ties",
        "base": "base.safetensors",
        "models": ["a.safetensors"],
        "parameters": {"bogus": 1},
    }
    result = CliRunner().invoke(
        app, ["merge", str(_write(root / "p.yaml", plan)), "--out", str(root / "m"), *runs]
    )
    assert "bogus" in _one_line_error(result) and not (root / "m").exists()
    plan.update(method="tiez", parameters={})
    result = CliRunner().invoke(
        app, ["merge", str(_write(root / "p.yaml", plan)), "--out", str(root / "m"), *runs]
    )
    assert "no merge method 'tiez'" in _one_line_error(result)
    (root / "junk.safetensors").write_text("not a safetensors file")
    plan.update(method="ties", models=["junk.safetensors"])
    result = CliRunner().invoke(
        app, ["merge", str(_write(root / "p.yaml", plan)), "--out", str(root / "m"), *runs]
    )
    assert "cannot read" in _one_line_error(result) and not (root / "m").exists()


def test_merge_recipe_from_python_equals_the_command(files):
    root, (base, a, b) = files
    plan = {"method": "dare_ties", "base": "base.safetensors", "models": ["a.safetensors", "b.safetensors"],
            "parameters": {"drop_rate": 0.5, "seed": 2}}  # fmt: skip
    runs = root / "runs"
    read, out, run = merge_plan(
        _write(root / "plan.yaml", plan), root / "py", progress=False, root=runs
    )
    assert read.method == "dare_ties" and out == root / "py" and run.parent == runs
    want = merge_state_dicts("dare_ties", base, [a, b], {"drop_rate": 0.5, "seed": 2})
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(MergeError, match="exists"):
        merge_plan(root / "plan.yaml", root / "py", progress=False, root=runs)


def test_mergekit_ties_file_as_is(files):
    root, (base, a, b) = files
    mk = {
        "merge_method": "ties", "base_model": "base.safetensors",
        "models": [
            {"model": "base.safetensors"},
            {"model": "a.safetensors", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "b.safetensors", "parameters": {"weight": 0.3, "density": 0.5}},
        ],
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32",
    }  # fmt: skip
    plan = load_plan(_write(root / "mk.yaml", mk))
    assert (
        plan.method == "ties"
        and plan.weights == [0.7, 0.3]
        and plan.base.endswith("base.safetensors")
    )
    assert plan.parameters == {"density": 0.5, "normalize": True}
    out = plan.run(root / "m", progress=False)
    want = merge_state_dicts("ties", base, [a, b], {"density": 0.5}, weights=[0.7, 0.3])
    torch.testing.assert_close(load_file(out / "model.safetensors")["w"], want["w"])


def test_mergekit_translations():
    dare = from_mergekit(
        {
            "merge_method": "dare_ties",
            "base_model": "x",
            "models": [{"model": "y", "parameters": {"density": 0.3, "weight": 1}}],
        }
    )
    # mergekit's dare_ties sums the agreeing task vectors (normalize false), lfm's default divides
    assert dare.parameters == {"drop_rate": pytest.approx(0.7), "normalize": False}
    ties = from_mergekit(
        {"merge_method": "ties", "base_model": "x", "models": ["y"], "parameters": {"lambda": 0.5}}
    )
    assert ties.parameters == {"density": 1.0, "scale": 0.5}  # mergekit's default density keeps all
    slerp = from_mergekit(
        {"merge_method": "slerp", "base_model": "x", "models": ["x", "y"], "parameters": {"t": 0.4}}
    )
    assert slerp.models == ["x", "y"] and slerp.base is None and slerp.parameters == {"t": 0.4}
    with pytest.raises(MergeError, match="density differ"):
        from_mergekit({"merge_method": "ties", "base_model": "x", "models": [
            {"model": "y", "parameters": {"density": 0.1}}, {"model": "z", "parameters": {"density": 0.2}}]})  # fmt: skip
    with pytest.raises(MergeError, match="not supported"):
        from_mergekit({"merge_method": "sce", "models": ["y"]})  # della is translated now


def test_merge_writes_a_run_with_input_hashes_and_lineage(tmp_path):
    runs, gen = tmp_path / "runs", torch.Generator().manual_seed(0)
    tuned = Run("tune", {}, root=runs)  # model a is the output of an earlier run
    folders = {"base": tmp_path / "base", "a": tuned.path / "a", "b": tmp_path / "b"}
    for folder in folders.values():
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file({"w": torch.randn(3, 4, generator=gen)}, str(tmp / "model.safetensors"))
    plan = _write(tmp_path / "plan.yaml", {"method": "task_arithmetic", "base": str(folders["base"]),
                                           "models": [str(folders["a"]), "b"]})  # fmt: skip
    res = CliRunner().invoke(app, ["merge", str(plan), "-o", str(tmp_path / "m"), "-q",
                                   "--root", str(runs)])  # fmt: skip
    assert res.exit_code == 0, res.output
    (run,) = runs.glob("*-merge-task_arithmetic")
    assert res.output.strip().splitlines()[-1] == f"run: {run}"
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and m["outputs"] == [str(tmp_path / "m")]
    assert {k: v["sha256"] for k, v in m["inputs"].items()} == {
        "plan": path_sha256(plan), "base": path_sha256(folders["base"]),
        "model0": path_sha256(folders["a"]), "model1": path_sha256(folders["b"]),
    }  # fmt: skip
    assert m["parents"] == [tuned.id]
    assert m["config"]["config"]["scale"] == 1.0 and m["config"]["models"][1] == str(folders["b"])
    # a plan whose shapes do not fit is refused before any run directory (or weight read)
    (tmp_path / "c").mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "c" / "model.safetensors"))
    bad = _write(tmp_path / "bad.yaml", {"method": "task_arithmetic", "base": "base",
                                         "models": [str(folders["a"]), "c"]})  # fmt: skip
    res = CliRunner().invoke(app, ["merge", str(bad), "-o", str(tmp_path / "m2"), "-q",
                                   "--root", str(runs)])  # fmt: skip
    assert res.exit_code == 2 and "error:" in res.output and "shape" in res.output
    assert not (tmp_path / "m2").exists() and list(runs.glob("*-merge-*")) == [run]
    # a merge that fails while merging (a NaN in the weights) leaves a failed run and no output
    (tmp_path / "d").mkdir()
    sd = load_file(str(folders["a"] / "model.safetensors"))
    first = next(iter(sd))
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(tmp_path / "d" / "model.safetensors"))
    nan = _write(tmp_path / "nan.yaml", {"method": "task_arithmetic", "base": "base",
                                         "models": [str(folders["a"]), "d"]})  # fmt: skip
    res = CliRunner().invoke(app, ["merge", str(nan), "-o", str(tmp_path / "m2"), "-q",
                                   "--root", str(runs)])  # fmt: skip
    assert "NaN" in _one_line_error(res) and not (tmp_path / "m2").exists()
    (failed,) = (p for p in runs.glob("*-merge-task_arithmetic*") if p != run)
    m = json.loads((failed / "manifest.json").read_text())
    assert m["status"].startswith("failed: ") and m["outputs"] == []
