"""The `lfm` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lfm.cli import app

from conftest import make_lm

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    from rich.console import Console

    import lfm.cli

    monkeypatch.setattr(lfm.cli, "out", Console(width=250))


def test_methods_table_and_filters():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    assert "survey branch" in res.output and "weight interpolation" in res.output
    only = runner.invoke(app, ["methods", "--access", "scores"])
    assert "WEIGHTS" not in only.output and "SCORES" in only.output
    meta = runner.invoke(app, ["methods", "--area", "meta"])
    assert "maml" in meta.output and "ties" not in meta.output


def test_models_and_datasets_list_the_assets():
    res = runner.invoke(app, ["models"])
    assert "smollm2-135m" in res.output and "mobilenet-v2" in res.output
    res = runner.invoke(app, ["datasets"])
    assert "fashion-mnist" in res.output and "bbc-news" in res.output


def test_info_and_generate_on_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    model, tok = make_lm("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    res = runner.invoke(app, ["info", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (
        f"{sum(p.numel() for p in model.parameters()):,}" in res.output
        and "transformer.h" in res.output
    )
    res = runner.invoke(
        app, ["generate", "Paris is", "--model", str(tmp_path / "m"), "--max-new-tokens", "3"]
    )
    assert res.exit_code == 0 and res.output.startswith("Paris is")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "./no/such/model"], "error: no such file or folder: no/such/model"),
        (["methods", "--area", "cooking"], "error: unknown area 'cooking'"),
        (["methods", "--access", "root"], "error: unknown access level 'root'"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "lfm", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0]
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["tunning"], "Did you mean 'tuning'?"),
        (["tuning", "train", "--stepz", "3"], "No such option: --stepz"),
        (["meta", "train", "--steps", "abc"], "Invalid value for '--steps'"),
        (["run", "no-such-pipeline.yaml"], "does not exist"),
        (["edit", "apply", "m", "-m", "teleport", "--prompt", "A is", "--subject", "A",
          "--target", "B", "-o", "p.st"], "no method 'edit/teleport'"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_one_error_line_and_no_traceback(argv, says, tmp_path):
    res = subprocess.run([sys.executable, "-m", "lfm", *argv], capture_output=True, text=True,
                         cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and says in res.stderr
    assert sum(line.lower().startswith("error") for line in res.stderr.splitlines()) == 1


def test_version():
    res = subprocess.run([sys.executable, "-m", "lfm", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("lfm 0.")
