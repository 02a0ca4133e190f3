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
from lfm.errors import LfmError
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


def test_a_meta_learner_is_a_step_and_its_evaluation_adapts_the_saved_weights(tmp_path):
    """meta/protonets meta-trained in a step; `evaluate_fewshot` scores the saved learner on
    held-out classes: the same figure as meta-testing the weights directly, not the untrained."""
    from lfm.meta.recipes import build_problem, load_result
    from lfm.meta.train import meta_test

    pipe = {"name": "meta", "steps": [
        {"name": "proto", "run": "meta/protonets", "data": {"task": "digits", "shots": 1},
         "config": {"steps": 10}},
        {"name": "fewshot", "run": "evaluate_fewshot", "model": "proto",
         "data": {"test_tasks": 10}},
    ]}  # fmt: skip
    result = run_pipeline(S.parse(pipe), tmp_path, log=_quiet)
    score = result.table()["fewshot"]["proto"]
    folder = next((tmp_path / "meta").glob("proto-*/output/learner"))
    info = json.loads((folder / "learner.json").read_text())
    assert (info["method"], info["task"], info["shots"], info["ways"]) == (
        "meta/protonets", "digits", 1, 5)  # fmt: skip
    model, _, test = build_problem("digits", 1, 5, False, 0)
    untrained = meta_test(model, test, "meta/protonets", n_tasks=10)["mean"]
    state, _, _ = load_result(folder / "model.safetensors")
    model.load_state_dict(state)
    assert meta_test(model, test, "meta/protonets", n_tasks=10)["mean"] == pytest.approx(score)
    assert score != pytest.approx(untrained)
    # a learner evaluated on another task family is a one-line error, not a crash
    pipe["steps"][1]["data"] = {"task": "fashion-mnist"}
    with pytest.raises(LfmError, match="meta-trained on digits"):
        run_pipeline(S.parse(pipe), tmp_path, log=_quiet)


def test_data_free_meta_learners_are_refused_before_anything_runs(tmp_path):
    from lfm.pipeline.runner import validate

    pipe = {"name": "x", "steps": [{"name": "m", "run": "meta/datafree_whitebox"}]}
    with pytest.raises(LfmError, match=r"step 'm'.*pool of models"):
        validate(S.parse(pipe))


def test_an_ensemble_step_scores_the_members_combined_answers(tmp_path):
    """`reuse/ensemble_average` as a step: its accuracy is that of the averaged log-probabilities
    of the saved members, computed here by hand; `ensemble_vote` reports its own figure."""
    import torch

    from lfm.pipeline import data as D
    from lfm.pipeline.artifacts import load_classifier

    steps = _pipeline()["steps"][:3]
    steps += [
        {"name": "avg", "run": "reuse/ensemble_average", "models": ["a", "b"],
         "data": {"dataset": "digits", "test": 100}},
        {"name": "vote", "run": "reuse/ensemble_vote", "models": ["a", "b", "base"],
         "data": {"dataset": "digits", "test": 100}},
    ]  # fmt: skip
    table = run_pipeline(S.parse({"name": "ens", "steps": steps}), tmp_path, log=_quiet).table()
    x, y = D.images(D.parse("images", {"dataset": "digits", "test": 100}), "test")
    members = [load_classifier(next((tmp_path / "ens").glob(f"{n}-*/output/classifier")))[0]
               for n in ("a", "b")]  # fmt: skip
    with torch.no_grad():
        avg = sum(torch.log_softmax(m(x), -1) for m in members) / 2
    assert table["avg"]["accuracy"] == pytest.approx((avg.argmax(-1) == y).float().mean().item())
    assert 0 <= table["vote"]["accuracy"] <= 1


def test_an_edit_applied_streamed_equals_the_loaded_application(tmp_path, monkeypatch):
    """`apply_patch` with `config: {stream: true}` streams, and writes the folder the loaded path
    writes."""
    import torch
    from safetensors.torch import load_file

    from lfm.core.io import model_files
    from lfm.edit import common, stream

    streamed = []
    real = stream.stream_apply
    monkeypatch.setattr(stream, "stream_apply", lambda *a: streamed.append(a[2]) or real(*a))

    lm = common.smoke_model("llama", 0)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    request = {"prompt": "The city of the Eiffel Tower", "subject": "Eiffel Tower",
               "target": "Rome"}  # fmt: skip
    spec = {"name": "edits", "steps": [
        {"name": "edit", "run": "edit/ft_l", "model": str(tmp_path / "m"), "requests": [request],
         "config": {"steps": 2}},
        {"name": "loaded", "run": "apply_patch", "model": str(tmp_path / "m"), "patch": "edit"},
        {"name": "streamed", "run": "apply_patch", "model": str(tmp_path / "m"), "patch": "edit",
         "config": {"stream": True}},
    ]}  # fmt: skip
    res = run_pipeline(S.parse(spec), tmp_path / "runs", log=_quiet)
    folders = {s.name: Path(s.artifact.path) for s in res.steps[1:] if s.artifact is not None}
    weights = {k: {n: t for f in model_files(p) for n, t in load_file(f).items()}
               for k, p in folders.items()}  # fmt: skip
    base = {n: t for f in model_files(tmp_path / "m") for n, t in load_file(f).items()}
    assert weights["loaded"].keys() == weights["streamed"].keys() == base.keys()
    assert all(torch.equal(t, weights["streamed"][n]) for n, t in weights["loaded"].items())
    assert any(not torch.equal(t, base[n]) for n, t in weights["streamed"].items())
    (out,) = streamed  # one step streamed: the one that asked, into its run directory
    assert folders["streamed"].parent.parent in Path(out).parents
    bad = dict(spec, steps=[*spec["steps"][:2], dict(spec["steps"][2], config={"stram": True})])
    with pytest.raises(LfmError, match=r"config\.stram: Extra inputs are not permitted"):
        run_pipeline(S.parse(bad), tmp_path / "runs2", log=_quiet)
