"""FitNets' hint between transformer blocks, from a teacher served at HIDDEN: the registered
`distill/fitnets` loss on token rows, with the LM loss beside it, gives the same student through
the server (token ids over HTTP) as from the local handle, and the hint is what shapes it."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalModel, narrow
from lfm.core.tiny import tiny_lm
from lfm.core.train import TrainConfig
from lfm.distill import distill
from lfm.errors import AccessError
from lfm.registry import run
from lfm.serve.app import ServeSettings, build_app
from lfm.serve.backend import Backend
from lfm.serve.client import RemoteModel
from lfm.serve.thread import running

TEXT = (
    "The teacher reads the text and the student learns from what the teacher says. "
    "A small model can learn a great deal from a larger one when both see the same words. "
) * 6
STEPS = 6


@pytest.fixture(scope="module")
def teacher():
    return LocalModel(*tiny_lm("llama", 0), name="teacher")


@pytest.fixture(scope="module")
def blocks(teacher):
    ids = torch.tensor(teacher.encode(TEXT))
    n = len(ids) // 16
    return list(ids[: n * 16].view(n, 16).split(2))  # batches of 2 rows of 16 tokens


def _student(teacher, blocks, handle, hint_weight=1.0, seed=7):
    student = tiny_lm("llama", seed)[0].train()
    losses = [("fitnets", hint_weight, None, "model.layers.0", "model.layers.1")]
    cfg = TrainConfig(steps=STEPS, lr=1e-2, progress=False, seed=0)
    history = distill(handle, student, blocks, losses, train_cfg=cfg, label_weight=1.0)
    return student, history


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_served_hidden_teacher_gives_the_local_student(teacher, blocks):
    local, _ = _student(teacher, blocks, narrow(teacher, "hidden"))
    with running(build_app(Backend(teacher, "hidden"), ServeSettings(api_key="k"))) as url:
        remote = RemoteModel(url, api_key="k", access="hidden")
        served, _ = _student(teacher, blocks, remote)
    torch.testing.assert_close(_weights(served), _weights(local), rtol=1e-4, atol=1e-5)
    # the hint shaped it: the LM loss alone, or another teacher's states, give other students
    alone, _ = _student(teacher, blocks, narrow(teacher, "hidden"), hint_weight=0.0)
    other = LocalModel(*tiny_lm("llama", 3), name="other")
    elsewhere, _ = _student(other, blocks, narrow(other, "hidden"))
    for student in (alone, elsewhere):
        assert (_weights(student) - _weights(local)).abs().max() > 1e-3
    # and the LM loss is there beside it: with no hint the student still moves
    assert (_weights(alone) - _weights(tiny_lm("llama", 7)[0])).abs().max() > 1e-3


def test_the_hint_loss_falls_and_the_regressor_trains(teacher, blocks):
    student = tiny_lm("llama", 7)[0].train()
    handle = narrow(teacher, "hidden")
    res = run("distill/fitnets", handle, student, blocks * 4, student_module="model.layers.0",
              teacher_module="model.layers.1", label_weight=0.0,
              train_cfg=TrainConfig(steps=24, lr=1e-2, progress=False))  # fmt: skip
    losses = res.history.losses
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


def test_a_logit_loss_from_a_served_language_model_is_refused(teacher, blocks):
    student = tiny_lm("llama", 7)[0]
    with running(build_app(Backend(teacher, "hidden"), ServeSettings(api_key="k"))) as url:
        remote = RemoteModel(url, api_key="k", access="hidden")
        with pytest.raises(AccessError, match="use distill/topk_lm"):
            distill(remote, student, blocks, [("kd", 1.0, None)])


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, teacher):
    path = tmp_path_factory.mktemp("teacher") / "llama"
    teacher.model.save_pretrained(path)
    teacher.tokenizer.save_pretrained(path)
    return path


def _lm(root, data, *extra):
    from typer.testing import CliRunner

    from lfm.cli.distill import app

    args = ["lm", "--data", str(data), "--every", "2", "--block-size", "16", "--batch-size", "2",
            "--eval-blocks", "2", "--threads", "1", "--steps", "4", "--lr", "1e-2", "--root",
            str(root), "--method", "fitnets", "--hint-weight", "100", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _metrics(root):
    import json

    (run_dir,) = root.iterdir()
    return run_dir, json.loads((run_dir / "manifest.json").read_text())


def test_cli_fitnets_served_equals_local(tmp_path, teacher, model_dir):
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "local", tmp_path / "t.txt", "--model", str(model_dir))
    assert out.exit_code == 0, out.output
    run_dir, m = _metrics(tmp_path / "local")
    assert m["status"] == "done" and m["metrics"]["hint"] == "model.layers.0"
    assert m["metrics"]["guided"] == "model.layers.0" and "teacher_ppl" in m["metrics"]
    assert (run_dir / "student" / "config.json").is_file()
    with running(build_app(Backend(teacher, "hidden"), ServeSettings())) as url:
        out = _lm(tmp_path / "served", tmp_path / "t.txt", "--model", str(model_dir),
                  "--teacher-url", url, "--hint", "model.layers.1")  # fmt: skip
        assert out.exit_code == 0, out.output
        same = _lm(tmp_path / "same", tmp_path / "t.txt", "--model", str(model_dir),
                   "--teacher-url", url)  # fmt: skip
        assert same.exit_code == 0, same.output
    _, other = _metrics(tmp_path / "served")
    _, served = _metrics(tmp_path / "same")
    assert other["metrics"]["hint"] == "model.layers.1" and "teacher_ppl" not in served["metrics"]
    want = m["metrics"]["student_ppl"]
    assert served["metrics"]["student_ppl"] == pytest.approx(want, rel=1e-4)
    assert other["metrics"]["student_ppl"] != pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--teacher-cache", "x.npz"], "no cache holds"),
        (["--teacher-url", "URL", "--student", "s"], "--hint model.layers.N"),
        (["--teacher-url", "SCORES"], "gives SCORES: serve it with `lfm serve --access hidden`"),
        (["--method", "topk_lm", "--hint", "model.layers.0"], "are for --method fitnets"),
    ],
)
def test_cli_fitnets_refuses_bad_options_in_one_line(tmp_path, teacher, extra, says, monkeypatch,
                                                     capsys):  # fmt: skip
    import sys

    import lfm.cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    with running(build_app(Backend(teacher, "scores"), ServeSettings())) as url:
        extra = [url if e in ("URL", "SCORES") else e for e in extra]
        argv = ["lfm", "distill", "lm", "--model", "nothing", "--data", "t.txt", "--method",
                "fitnets", *extra]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            lfm.cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert done.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "runs").exists()


def test_cli_fitnets_refuses_a_student_of_another_vocabulary(tmp_path, model_dir):
    model, tok = tiny_lm("llama", 1, vocab_size=200)
    model.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "runs", tmp_path / "t.txt", "--model", str(model_dir), "--student",
              str(tmp_path / "small"))  # fmt: skip
    assert out.exit_code == 2 and not (tmp_path / "runs").exists()
    assert "need one tokenizer" in out.output and "--method uld" in out.output
