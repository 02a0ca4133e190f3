"""`lfm distill datafree --resume`: a run killed after a checkpoint, resumed, ends as an
uninterrupted one (student weights, accuracy, teacher queries, curves) with fewer teacher calls;
a resume with other options is one line with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import lfm.distill.recipes
from lfm.cli.distill import app
from lfm.core.checkpoints import Checkpoints


class Killed(Exception):
    """The process dying after a checkpoint."""


def make_folder(root, classes: int = 3, per_class: int = 6, size: int = 8):
    """`root/c<k>/<i>.png`: grey images whose mean brightness names the class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.uniform(0, 80, (size, size)) + 80 * c
            Image.fromarray(pixels.astype(np.uint8), "L").save(root / f"c{c}" / f"{i}.png")
    return root


class TeacherCalls:
    """Counts the teacher's forward passes after its training (the data-free stage and the
    accuracy) and notes each checkpoint of the method's loop; with `kill` set, the first teacher
    call after such a checkpoint raises `Killed`."""

    def __init__(self, monkeypatch):
        self.calls, self.saved, self.kill = 0, [], False
        fit, write = lfm.distill.recipes.fit_teacher, Checkpoints.write

        def counted_teacher(*args, **kwargs):
            teacher, hist = fit(*args, **kwargs)
            teacher.register_forward_pre_hook(self._called)
            return teacher, hist

        def write_and_note(ckpt, step, *args, **kwargs):
            write(ckpt, step, *args, **kwargs)
            self.saved.append(step)

        monkeypatch.setattr(lfm.distill.recipes, "fit_teacher", counted_teacher)
        monkeypatch.setattr(Checkpoints, "write", write_and_note)

    def _called(self, module, inputs) -> None:
        if self.kill and self.saved:
            raise Killed(f"killed after the checkpoint of step {self.saved[-1]}")
        self.calls += 1

    def reset(self, kill: bool = False) -> None:
        self.calls, self.saved, self.kill = 0, [], kill


def _datafree(args, root):
    return CliRunner().invoke(app, ["datafree", *args, "--root", str(root)])


def _run_dir(root):
    (run,) = list(root.iterdir())
    return run, json.loads((run / "manifest.json").read_text())


def _args(folder, method: str, *extra: str) -> list[str]:
    return ["--method", method, "--data", str(folder), "--image-size", "8", "--teacher-steps", "4",
            "--iterations", "4", "--batch-size", "4", "--ckpt-every", "2", "--threads", "1",
            *extra]  # fmt: skip


CASES = {
    "dafl": [],
    "dfad": [],
    "dfme": [],
    "deep_inversion": ["--synthesis-steps", "2", "--kd-steps", "4"],
    "adaptive_deep_inversion": ["--synthesis-steps", "2", "--kd-steps", "4", "--competition", "1"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_interrupted_datafree_run_resumes_to_the_uninterrupted_student(
    tmp_path, monkeypatch, case
):
    method = case.removeprefix("adaptive_")
    args = _args(make_folder(tmp_path / "images"), method, *CASES[case])
    teacher = TeacherCalls(monkeypatch)
    whole = _datafree(args, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    w_run, w = _run_dir(tmp_path / "whole")
    full_calls = teacher.calls
    assert teacher.saved == [2, 4]

    teacher.reset(kill=True)
    killed = _datafree(args, tmp_path / "runs")
    assert isinstance(killed.exception, Killed), killed.output
    run, m = _run_dir(tmp_path / "runs")
    assert m["status"].startswith("failed") and not (run / "student.safetensors").exists()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 2

    teacher.reset()
    resumed = _datafree([*args, "--resume", str(run)], tmp_path / "runs")
    assert resumed.exit_code == 0, resumed.output
    assert teacher.saved == [4] and 0 < teacher.calls < full_calls  # updates 3 and 4 only
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and len(m["resumed"]) == 1
    for name in ("teacher", "student"):
        a = load_file(str(w_run / f"{name}.safetensors"))
        b = load_file(str(run / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert m["metrics"] == w["metrics"]  # the accuracies and the teacher queries
    assert {k: h["value"] for k, h in m["history"].items()} == {
        k: h["value"] for k, h in w["history"].items()
    }


def test_resuming_a_datafree_run_with_other_options_is_one_line(tmp_path):
    args = _args(make_folder(tmp_path / "images"), "dfad")
    assert _datafree(args, tmp_path / "runs").exit_code == 0
    run, _ = _run_dir(tmp_path / "runs")
    res = _datafree([*args, "--iterations", "5", "--resume", str(run)], tmp_path / "runs")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "holds another config" in lines[0]
    res = _datafree([*args, "--resume", str(tmp_path / "nowhere")], tmp_path / "runs")
    assert res.exit_code == 2 and "is not a run directory" in res.output
    assert not (tmp_path / "nowhere").exists()
