"""`lfm meta train --data DIR`: few-shot tasks from a folder of class folders, resuming a run from
its checkpoint, and the learning curves of a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lfm.cli.meta import app
from lfm.core.runs import path_sha256

TINY = ["--steps", "4", "--test-tasks", "10", "--image-size", "12", "--threads", "1"]


def _stripes(c: int, i: int, size: int = 12) -> np.ndarray:
    """Image `i` of class `c`: stripes whose direction (c % 2) and period (2 + c // 2) name the
    class, at a random phase, with noise."""
    rng = np.random.default_rng(100 * c + i)
    axis = np.arange(size)[:, None] if c % 2 else np.arange(size)[None, :]
    period = 2 + c // 2
    wave = ((axis + rng.integers(period)) % period < period / 2).astype(float)
    img = np.broadcast_to(wave, (size, size)) * 200 + rng.uniform(0, 55, (size, size))
    return img.astype(np.uint8)


def make_folder(root, classes=8, per_class=8, start=0):
    """`root/c<k>/<i>.png`: `classes` classes of `per_class` greyscale images each."""
    for c in range(start, start + classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_stripes(c, i), "L").save(root / f"c{c}" / f"{i}.png")
    return root


def _train(args, root):
    return CliRunner().invoke(app, ["train", *args, "--root", str(root)])


def _run_dir(root):
    (run,) = list(root.iterdir())
    return run, json.loads((run / "manifest.json").read_text())


@pytest.mark.parametrize("method", ["protonets", "maml"])
def test_a_task_folder_trains_records_its_split_and_hash_and_beats_chance(tmp_path, method):
    data = make_folder(tmp_path / "chars")
    args = ["--data", str(data), "--method", method, "--ways", "3", "--shots", "1",
            "--test-classes", "3", "--meta-batch", "2", *TINY]  # fmt: skip
    result = _train(args, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert f"meta/{method} {data} 3-way 1-shot: accuracy" in result.output
    run, m = _run_dir(tmp_path / "runs")
    assert m["status"] == "done" and m["inputs"]["data"]["sha256"] == path_sha256(data)
    split = m["task"]["split"]
    assert len(split["train"]) == 5 and len(split["test"]) == 3
    assert sorted(split["train"] + split["test"]) == [f"c{c}" for c in range(8)]
    assert m["task"]["image_size"] == 12 and m["task"]["channels"] == 1
    assert m["metrics"]["test_n"] == 10
    assert (run / "curves.png").stat().st_size > 0 and "curves.png" in m["outputs"]
    assert len(m["history"]["meta_loss"]["value"]) == 4
    state = load_file(str(run / "model.safetensors"))
    assert state["body.0.0.weight"].shape == (32, 1, 3, 3)  # a ConvNet on one channel
    if method == "protonets":
        assert m["metrics"]["test_mean"] > 1 / 3 + 0.1  # held-out classes, well above chance


def test_the_split_follows_the_seed(tmp_path):
    data = make_folder(tmp_path / "chars")
    splits = []
    for seed in ("0", "1"):
        root = tmp_path / f"runs{seed}"
        args = ["--data", str(data), "--method", "protonets", "--ways", "2", "--shots", "1",
                "--seed", seed, *TINY]  # fmt: skip
        assert _train(args, root).exit_code == 0
        splits.append(_run_dir(root)[1]["task"]["split"])
    assert all(len(s["test"]) == 2 for s in splits)  # 0.2 of 8 classes, rounded
    assert splits[0] != splits[1]


def test_train_and_test_folders_give_the_split(tmp_path):
    data = tmp_path / "split"
    make_folder(data / "train", classes=4)
    make_folder(data / "test", classes=3, start=4)
    make_folder(data / "val", classes=1, per_class=1, start=7)  # beside them, not read
    args = ["--data", str(data), "--method", "fomaml", "--ways", "3", "--shots", "2", *TINY]
    result = _train(args, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    _, m = _run_dir(tmp_path / "runs")
    assert m["task"]["split"] == {"train": ["c0", "c1", "c2", "c3"], "test": ["c4", "c5", "c6"]}


@pytest.mark.parametrize(
    ("make", "args", "says"),
    [
        (lambda d: make_folder(d, classes=4), ["--ways", "3"],
         "has 1 meta-test classes; 3-way episodes need at least 3"),
        (lambda d: make_folder(d, classes=8, per_class=4), ["--ways", "2", "--shots", "1"],
         "has 4 images; 1-shot episodes with 5 queries need 6"),
        (lambda d: make_folder(d / "train", classes=4), ["--ways", "2"], "has train/ but no test/"),
        (lambda d: d.mkdir(), ["--ways", "2"], "holds no class folders"),
        (lambda d: None, ["--ways", "2"], "does not exist"),
        (lambda d: make_folder(d), ["--ways", "2", "--task", "digits"], "not both"),
        (lambda d: make_folder(d), ["--ways", "2", "--test-classes", "8"], "leaves no class"),
    ],
    ids=["ways", "images", "no-test", "empty", "missing", "with-task", "test-classes"],
)  # fmt: skip
def test_folder_errors_are_one_line_before_a_run(tmp_path, make, args, says):
    data = tmp_path / "chars"
    make(data)
    result = _train(["--data", str(data), "--method", "protonets", *args, *TINY], tmp_path / "runs")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], lines
    assert not (tmp_path / "runs").exists()


class Interrupt(RuntimeError):
    """Stands for a killed process."""


@pytest.mark.parametrize(
    "problem",
    [["--method", "metasgd", "--task", "sinusoid", "--meta-batch", "2"],
     ["--method", "protonets", "--ways", "3", "--shots", "1", "--test-classes", "3"]],
    ids=["metasgd-sinusoid", "protonets-folder"],
)  # fmt: skip
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path, monkeypatch, problem
):
    import lfm.meta.train as meta_train

    if "--task" not in problem:
        problem = [*problem, "--data", str(make_folder(tmp_path / "chars"))]
    args = [*problem, *TINY, "--steps", "6", "--ckpt-every", "2"]
    assert _train(args, tmp_path / "whole").exit_code == 0
    whole, m_whole = _run_dir(tmp_path / "whole")

    real, calls = meta_train._set_grads, []

    def dies_at_step_4(*a):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint of step 2 and one more update
            raise Interrupt
        return real(*a)

    monkeypatch.setattr(meta_train, "_set_grads", dies_at_step_4)
    killed = _train(args, tmp_path / "runs")
    assert isinstance(killed.exception, Interrupt)
    run, m = _run_dir(tmp_path / "runs")
    assert m["status"].startswith("failed") and not (run / "model.safetensors").exists()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 2

    monkeypatch.setattr(meta_train, "_set_grads", real)
    calls.clear()
    resumed = _train([*args, "--resume", str(run)], tmp_path / "runs")
    assert resumed.exit_code == 0, resumed.output
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and len(m["resumed"]) == 1
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "metasgd" in problem:
        assert any(k.startswith("inner_lr/") for k in a)  # the learned step sizes resumed too
    assert m["history"]["meta_loss"] == m_whole["history"]["meta_loss"]
    assert m["metrics"]["test_mean"] == m_whole["metrics"]["test_mean"]


def test_resume_refuses_other_options_and_non_runs(tmp_path):
    args = ["--method", "maml", "--task", "sinusoid", "--meta-batch", "2", *TINY]
    assert _train(args, tmp_path / "runs").exit_code == 0
    run, _ = _run_dir(tmp_path / "runs")
    for extra, says in [(["--shots", "3"], "other task options (shots)"),
                        (["--steps", "5"], "holds another config")]:  # fmt: skip
        result = _train([*args, *extra, "--resume", str(run)], tmp_path / "runs")
        assert result.exit_code == 2 and says in result.output, result.output
    result = _train([*args, "--resume", str(tmp_path / "nowhere")], tmp_path / "runs")
    assert result.exit_code == 2 and "is not a run directory" in result.output
    assert not (tmp_path / "nowhere").exists()
    other = ["--method", "fomaml", *args[2:], "--resume", str(run)]
    result = _train(other, tmp_path / "runs")
    assert result.exit_code == 2 and "is a meta-maml run, not meta-fomaml" in result.output


def test_a_colour_class_makes_every_side_rgb(tmp_path):
    from lfm.meta.folders import folder_tasks

    data = tmp_path / "split"
    make_folder(data / "train", classes=2)
    make_folder(data / "test", classes=2, start=2)
    red = np.zeros((12, 12, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red, "RGB").save(data / "test" / "c2" / "0.png")
    tasks = folder_tasks(data, ways=2, shots=1, size=12)
    assert tasks.channels == 3
    assert tasks.train.pools[0].shape == (8, 3, 12, 12)  # grey train/ repeated in RGB
    assert tasks.test.pools[0][0, 0].min() == 1.0 and tasks.test.pools[0][0, 1].max() == 0.0
