"""`lfm distill vision|datafree|lm` on the user's own images and text: made folders and files, tiny
models, tiny step counts; the manifest's classes, split and input hashes; `curves.png`; one-line
refusals of bad data; an interrupted `lm` run resumed to the same student."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lfm.core.train
from lfm.core.runs import path_sha256
from lfm.distill.vision import holdout_split

CLASSES = ("checks", "hstripes", "vstripes")
TEXT = (
    "The teacher reads the text and the student learns from what the teacher says. "
    "A small model can learn a great deal from a larger one when both see the same words. "
) * 12


def _pattern(kind: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A (size, size) grey image in [0, 1]: stripes or checks at a random phase, plus noise."""
    i = torch.arange(size)
    shift = int(torch.randint(0, 4, (1,), generator=g))
    rows, cols = ((i + shift) // 2 % 2).view(-1, 1), ((i + shift) // 2 % 2).view(1, -1)
    base = {"hstripes": rows.expand(size, size), "vstripes": cols.expand(size, size),
            "checks": (rows + cols) % 2}[kind].float()  # fmt: skip
    return (0.8 * base + 0.2 * torch.rand(size, size, generator=g)).clamp(0, 1)


def make_folder(root, per_class: int = 16, classes=CLASSES, size: int = 12, seed: int = 0):
    """`root/<class>/<i>.png`: `per_class` grey PNGs per class with a class-distinct pattern."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True)
        for n in range(per_class):
            pixels = (255 * _pattern(kind, size, g)).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / kind / f"{n:03d}.png")
    return root


def _invoke(args):
    from lfm.cli.distill import app

    return CliRunner().invoke(app, args)


def _main(argv, monkeypatch, capsys) -> tuple[int, str]:
    """The `lfm` entry point in this process; (exit status, stderr)."""
    import lfm.cli

    monkeypatch.setattr(sys, "argv", ["lfm", *argv])
    with pytest.raises(SystemExit) as done:
        lfm.cli.main()
    return done.value.code, capsys.readouterr().err


def _only_run(root):
    (run,) = root.iterdir()
    return run, json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, as a teacher folder."""
    from lfm.core.tiny import tiny_lm

    model, tok = tiny_lm("llama", 0)
    path = tmp_path_factory.mktemp("teacher") / "llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_holdout_split_is_stratified_seeded_and_keeps_every_class_in_training():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    tr, te = holdout_split(y, 0.2, seed=3)
    assert torch.bincount(y[te], minlength=3).tolist() == [2, 1, 0]  # a class of one stays
    assert sorted(tr.tolist() + te.tolist()) == list(range(len(y)))
    assert torch.equal(holdout_split(y, 0.2, seed=3)[1], te)
    assert not torch.equal(holdout_split(y, 0.5, seed=4)[1], holdout_split(y, 0.5, seed=5)[1])


def test_vision_on_an_image_folder_records_classes_split_hash_and_beats_chance(tmp_path):
    folder = make_folder(tmp_path / "images")
    args = ["vision", "--data", str(folder), "--image-size", "12", "--holdout", "0.25",
            "--teacher-steps", "40", "--student-steps", "40", "--batch-size", "16",
            "--threads", "1", "--root", str(tmp_path / "runs")]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    run, manifest = _only_run(tmp_path / "runs")
    assert manifest["status"] == "done"
    assert manifest["data"] == {"classes": list(CLASSES), "layout": "holdout", "holdout": 0.25,
                                "seed": 0, "train": 36, "test": 12}  # fmt: skip
    assert manifest["inputs"]["data"]["sha256"] == path_sha256(folder)
    assert manifest["metrics"]["student_acc"] > 1 / 3 + 0.2  # 3 classes: chance is 1/3
    assert manifest["metrics"]["teacher_acc"] > 1 / 3 + 0.2
    assert (run / "curves.png").is_file()
    assert len(manifest["history"]["teacher_loss"]["value"]) == 40
    assert len(manifest["history"]["student_loss"]["value"]) == 40
    head = load_file(str(run / "student.safetensors"))["head.weight"]
    assert head.shape[0] == 3  # built for the folder's classes


def test_vision_on_rgb_train_and_test_folders(tmp_path):
    from PIL import Image

    make_folder(tmp_path / "d" / "train", per_class=6)
    make_folder(tmp_path / "d" / "test", per_class=2, seed=1)
    Image.new("RGB", (12, 12), (200, 10, 10)).save(tmp_path / "d" / "train" / "checks" / "red.png")
    args = ["vision", "--method", "student", "--data", str(tmp_path / "d"), "--image-size", "8",
            "--teacher-steps", "2", "--student-steps", "2", "--root", str(tmp_path / "runs")]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    run, manifest = _only_run(tmp_path / "runs")
    assert manifest["data"] == {"classes": list(CLASSES), "layout": "train/test", "train": 19,
                                "test": 6}  # fmt: skip
    stem = load_file(str(run / "teacher.safetensors"))["block1.0.weight"]
    assert stem.shape[1] == 3  # one RGB image: the CNNs take 3 channels


def test_datafree_on_an_image_folder_tests_the_student_on_held_out_images(tmp_path):
    folder = make_folder(tmp_path / "images", per_class=8)
    args = ["datafree", "--method", "dfad", "--data", str(folder), "--image-size", "8",
            "--teacher-steps", "3", "--iterations", "2", "--batch-size", "4", "--threads", "1",
            "--root", str(tmp_path / "runs")]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    run, manifest = _only_run(tmp_path / "runs")
    assert manifest["data"]["classes"] == list(CLASSES) and manifest["data"]["test"] == 6
    assert manifest["metrics"]["queries"] == 2 * 4 * (1 + 5)
    assert set(manifest["history"]) == {"teacher_loss", "student_loss", "generator_loss"}
    assert (run / "curves.png").is_file()
    assert load_file(str(run / "student.safetensors"))["head.weight"].shape[0] == 3


def test_deep_inversion_on_an_image_folder_synthesises_its_shape(tmp_path):
    folder = make_folder(tmp_path / "images", per_class=4)
    args = ["datafree", "--method", "deep_inversion", "--data", str(folder), "--image-size", "10",
            "--teacher-steps", "2", "--iterations", "1", "--batch-size", "3",
            "--synthesis-steps", "2", "--kd-steps", "2", "--root", str(tmp_path / "runs")]  # fmt: skip
    out = _invoke(args)
    assert out.exit_code == 0, out.output
    run, manifest = _only_run(tmp_path / "runs")
    assert manifest["metrics"]["queries"] == 3 * (2 + 2)
    assert len(manifest["history"]["synthesis_loss"]["value"]) == 2
    assert len(manifest["history"]["student_loss"]["value"]) == 2
    assert (run / "curves.png").is_file()


def _bad_folders(tmp_path):
    (tmp_path / "empty_class" / "a").mkdir(parents=True)
    make_folder(tmp_path / "empty_class", classes=("checks",), per_class=2)
    make_folder(tmp_path / "mismatch" / "train", per_class=2)
    make_folder(tmp_path / "mismatch" / "test", classes=("checks", "hstripes"), per_class=1)
    make_folder(tmp_path / "half" / "train", per_class=2)
    make_folder(tmp_path / "odd", per_class=2)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["vision", "--data", "missing"], "does not exist"),
        (["vision", "--data", "empty_class"], "holds no images"),
        (["datafree", "--data", "mismatch"], "hold different classes"),
        (["vision", "--data", "half"], "no test/"),
        (["vision", "--data", "odd", "--holdout", "1.5"], "between 0 and 1"),
        (["datafree", "--method", "dafl", "--data", "odd", "--image-size", "10"], "multiple of 4"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_image_folders_are_one_line_and_exit_status_2(
    argv, says, tmp_path, monkeypatch, capsys
):
    _bad_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = _main(["distill", *argv, "--root", "runs"], monkeypatch, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("text", "extra", "says"),
    [
        ("too short", [], "the training text"),
        (TEXT, ["--eval-data", "tiny.txt"], "the perplexity text"),
        ("\ufffd".encode() + b"\xff\xfe", [], "not UTF-8"),
    ],
)
def test_unusable_text_is_one_line_before_the_teacher_loads(
    text, extra, says, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text("short")
    data = tmp_path / "data.txt"
    data.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = ["distill", "lm", "--model", "./no/such/teacher", "--data", "data.txt", *extra]
    code, err = _main(argv, monkeypatch, capsys)  # the teacher does not exist: refused first
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err


def _lm_args(teacher, data, root, *extra):
    return ["lm", "--model", str(teacher), "--data", str(data), "--every", "2", "--block-size",
            "16", "--batch-size", "2", "--eval-blocks", "2", "--threads", "1", "--root",
            str(root), *extra]  # fmt: skip


@pytest.mark.parametrize("method", ["lm_student", "seq_kd"])
def test_lm_on_a_text_file_with_a_tiny_teacher(tmp_path, teacher_dir, method):
    data = tmp_path / "notes.txt"
    data.write_text(TEXT)
    out = _invoke(
        _lm_args(teacher_dir, data, tmp_path / "runs", "--method", method, "--steps", "3")
    )
    assert out.exit_code == 0, out.output
    run, manifest = _only_run(tmp_path / "runs")
    assert manifest["status"] == "done"
    assert all(manifest["metrics"][k] > 1 for k in ("teacher_ppl", "student_ppl"))
    assert manifest["inputs"]["data"]["sha256"] == path_sha256(data)
    assert manifest["data"]["split"] == f"first 90 % of {data} / last 10 %"
    assert manifest["data"]["eval_blocks"] >= 1 and manifest["data"]["train_blocks"] >= 2
    assert len(manifest["history"]["student_loss"]["value"]) == 3
    assert (run / "curves.png").is_file() and (run / "student" / "config.json").is_file()


def test_an_interrupted_lm_run_resumes_to_the_same_student(tmp_path, teacher_dir, monkeypatch):
    data = tmp_path / "notes.txt"
    data.write_text(TEXT)
    flags = ["--steps", "4", "--ckpt-every", "2"]
    whole = _invoke(_lm_args(teacher_dir, data, tmp_path / "whole", *flags))
    assert whole.exit_code == 0, whole.output

    save = lfm.core.train.save_checkpoint

    def save_then_die(run, acc, model, opt, step, hist):
        save(run, acc, model, opt, step, hist)
        raise RuntimeError(f"killed after the checkpoint at step {step}")

    monkeypatch.setattr(lfm.core.train, "save_checkpoint", save_then_die)
    cut = _invoke(_lm_args(teacher_dir, data, tmp_path / "cut", *flags))
    assert cut.exit_code == 1 and "step 2" in str(cut.exception)
    run, manifest = _only_run(tmp_path / "cut")
    assert manifest["status"].startswith("failed") and not (run / "student").exists()
    monkeypatch.setattr(lfm.core.train, "save_checkpoint", save)
    step, taken = lfm.core.train._step, []

    def counted(*args, **kwargs):
        taken.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(lfm.core.train, "_step", counted)
    again = _invoke(_lm_args(teacher_dir, data, tmp_path / "cut", *flags, "--resume", str(run)))
    assert again.exit_code == 0, again.output
    assert len(taken) == 2  # steps 3 and 4 only: it went on from the checkpoint
    _, manifest = _only_run(tmp_path / "cut")
    assert manifest["status"] == "done" and len(manifest["resumed"]) == 1
    assert len(manifest["history"]["student_loss"]["value"]) == 4
    got = load_file(str(run / "student" / "model.safetensors"))
    (whole_run,) = (tmp_path / "whole").iterdir()
    want = load_file(str(whole_run / "student" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resuming_an_lm_run_on_changed_text_is_refused(tmp_path, teacher_dir):
    data = tmp_path / "notes.txt"
    data.write_text(TEXT)
    first = _invoke(_lm_args(teacher_dir, data, tmp_path / "runs", "--steps", "1"))
    assert first.exit_code == 0, first.output
    (run,) = (tmp_path / "runs").iterdir()
    data.write_text(TEXT.upper())
    again = _invoke(
        _lm_args(teacher_dir, data, tmp_path / "runs", "--steps", "1", "--resume", str(run))
    )
    assert again.exit_code == 2 and "has changed since the run began" in again.output
