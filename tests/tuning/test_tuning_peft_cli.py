"""The `sft` and `train` command functions, mounted on a throwaway Typer app, on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from lfm.cli import tuning_peft
from lfm.tuning.peft_methods import check_adapter_dir
from lfm.tuning.sft import make_instructions

from conftest import make_lm


@pytest.fixture
def app():
    app = typer.Typer()
    app.command("train")(tuning_peft.train)
    app.command("sft")(tuning_peft.sft)
    return app


def test_sft_command_writes_a_run_with_a_peft_adapter(app, tmp_path):
    model, tok = make_lm("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_instructions(6)))
    args = [
        "sft",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(data),
        "--steps",
        "2",
        "--lr",
        "1e-2",
    ]
    res = CliRunner().invoke(app, [*args, "--root", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert check_adapter_dir(run / "tuned" / "adapter") > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and "final_loss" in manifest["metrics"]


def test_train_command_refuses_an_unknown_task(app):
    res = CliRunner().invoke(app, ["train", "--task", "imdb"])
    assert res.exit_code != 0 and "unknown task 'imdb'" in res.output
