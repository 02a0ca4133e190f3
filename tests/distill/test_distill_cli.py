"""`lfm distill vision` end to end on a few Fashion-MNIST images, then resumed."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.distill.vision import FASHION_DIR

pytestmark = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST is not installed")


def test_vision_command_writes_a_run_and_resumes(tmp_path):
    from lfm.cli.distill import app

    args = ["vision", "--method", "kd", "--train-size", "128", "--test-size", "64", "--teacher-steps", "2",
            "--student-steps", "2", "--batch-size", "32", "--root", str(tmp_path)]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    (run,) = tmp_path.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and 0 <= manifest["metrics"]["student_acc"] <= 1
    assert (run / "student.safetensors").is_file() and (run / "student" / "checkpoint").is_dir()
    again = CliRunner().invoke(app, [*args, "--resume", str(run)])
    assert again.exit_code == 0, again.output
    state = torch.load(run / "student" / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2  # nothing left to do: no new steps
    assert "student_acc" in json.loads((run / "manifest.json").read_text())["metrics"]


def test_datafree_command_writes_a_run(tmp_path):
    from lfm.cli.distill import app

    args = ["datafree", "--method", "dfme", "--train-size", "128", "--test-size", "64",
            "--teacher-steps", "2", "--iterations", "1", "--batch-size", "8", "--root", str(tmp_path)]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    (run,) = tmp_path.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["queries"] == 8 * 2 + 5 * 8
    assert (run / "student.safetensors").is_file()


def test_datafree_deepinversion_command_writes_a_run(tmp_path):
    from lfm.cli.distill import app

    args = ["datafree", "--method", "deepinversion", "--train-size", "128", "--test-size", "64",
            "--teacher-steps", "2", "--iterations", "2", "--batch-size", "8", "--synthesis-steps", "3",
            "--kd-steps", "4", "--root", str(tmp_path)]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    (run,) = tmp_path.iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["queries"] == 8 * (2 * 3 + 4)
    assert (run / "student.safetensors").is_file() and "deepinversion" in out.output
