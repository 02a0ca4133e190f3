"""Pipelines run with lineage: run directories, input hashes, skipping and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfm.core.runs import ancestry, path_sha256, read_manifest
from lfm.pipeline import spec as S
from lfm.pipeline.runner import run_pipeline


def _pipeline(b_steps: int = 5) -> dict:
    cnn = {"arch": "tiny_cnn", "n_out": 10, "width": 8}
    return {
        "name": "tiny",
        "steps": [
            {"name": "base", "run": "train_classifier", "student": cnn,
             "data": {"dataset": "digits", "train": 200, "test": 100}, "train": {"steps": 5}},
            {"name": "a", "run": "train_classifier", "base": "base",
             "data": {"dataset": "digits", "classes": [0, 1, 2, 3, 4], "train": 200}, "train": {"steps": 5}},
            {"name": "b", "run": "train_classifier", "base": "base",
             "data": {"dataset": "digits", "classes": [5, 6, 7, 8, 9], "train": 200},
             "train": {"steps": b_steps}},
            {"name": "merged", "run": "reuse/task_arithmetic", "models": ["a", "b"], "base": "base",
             "config": {"scale": 0.5}},
            {"name": "acc", "run": "evaluate_accuracy", "models": ["a", "b", "merged"],
             "data": {"dataset": "digits", "test": 100}},
        ],
    }  # fmt: skip


def _quiet(_msg: str) -> None:
    pass


def test_steps_record_lineage_skip_when_unchanged_and_rerun_downstream(tmp_path):
    first = run_pipeline(S.parse(_pipeline()), tmp_path, log=_quiet)
    assert [s.skipped for s in first.steps] == [False] * 5
    table = first.table()
    assert set(table["acc"]) == {"a", "b", "merged"} and all(
        0 <= v <= 1 for v in table["acc"].values()
    )
    merged = next(s for s in first.steps if s.name == "merged")
    m = read_manifest(tmp_path / "tiny" / merged.run_id)
    # the manifest's hashes are the hashes of the files the step read, its parents the runs
    assert m["status"] == "done" and len(m["parents"]) == 3
    for info in m["inputs"].values():
        assert info["sha256"] == path_sha256(info["path"])
    names = [r.get("name") for _, r in ancestry(merged.run_id, tmp_path / "tiny")]
    assert names[0] == "merged" and {"a", "b", "base"} <= set(names)
    # unchanged: every step skipped, the same figures
    again = run_pipeline(S.parse(_pipeline()), tmp_path, log=_quiet)
    assert [s.skipped for s in again.steps] == [True] * 5 and again.table() == table
    # a changed step reruns, with everything below it; what it does not feed is skipped
    changed = run_pipeline(S.parse(_pipeline(b_steps=6)), tmp_path, log=_quiet)
    assert {s.name: s.skipped for s in changed.steps} == {
        "base": True, "a": True, "b": False, "merged": False, "acc": False,
    }  # fmt: skip
    summary = json.loads((tmp_path / "tiny" / "pipeline.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["base", "a", "b", "merged", "acc"]


def test_a_changed_input_file_reruns_its_step(tmp_path):
    run_pipeline(S.parse(_pipeline()), tmp_path / "one", log=_quiet)
    base_dir = next((tmp_path / "one" / "tiny").glob("base-*/output/classifier"))
    data = _pipeline()
    data["name"] = "from-folder"
    data["steps"] = [s for s in data["steps"] if s["name"] != "base"]
    for s in data["steps"]:
        if s.get("base") == "base":
            s["base"] = str(base_dir)
    run_pipeline(S.parse(data), tmp_path, log=_quiet)
    from safetensors.torch import load_file, save_file

    weights = base_dir / "model.safetensors"
    from lfm.core.io import read_meta

    meta = {k: str(v) if k == "format" else json.dumps(v) for k, v in read_meta(weights).items()}
    tensors = load_file(str(weights))
    tensors["head.bias"] = tensors["head.bias"] + 1.0
    save_file(tensors, str(weights), meta)
    rerun = run_pipeline(S.parse(data), tmp_path, log=_quiet)
    assert [s.skipped for s in rerun.steps] == [False] * 4


@pytest.mark.slow
def test_killed_in_step_3_resumes_and_ends_as_an_uninterrupted_run(tmp_path):
    """The example pipeline from `lfm run`: killed during step 3, rerun, same final table."""
    src = Path(__file__).resolve().parents[2] / "examples" / "pipelines" / "digits-experts.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lfm", "run", str(src)]
    subprocess.run([*cmd, "--root", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)  # fmt: skip
    proc = subprocess.Popen([*cmd, "--root", str(tmp_path / "cut")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    folder = tmp_path / "cut" / "digits-experts"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(folder.glob("expert_high-*/manifest.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step3 = next(folder.glob("expert_high-*"))
    assert read_manifest(step3)["status"] == "running" and not (step3 / "output").exists()
    out = subprocess.run([*cmd, "--root", str(tmp_path / "cut")], check=True, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert "base: finished before, skipped" in out.stderr
    assert "expert_low: finished before, skipped" in out.stderr
    assert "expert_high: train_classifier" in out.stderr
    assert not list(step3.glob(".output.*.tmp"))  # what the killed step left is cleared
    whole = (tmp_path / "whole" / "digits-experts" / "table.md").read_text()
    assert (folder / "table.md").read_text() == whole
    assert "| all_digits |" in whole
