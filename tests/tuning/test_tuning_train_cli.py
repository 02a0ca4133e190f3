"""`lfm tuning train` / `sft` on a tiny saved model, and the recipes they call.

The commands parse, call `lfm.tuning.recipes` and print; a user error is one line with exit
status 2; the run's manifest holds plain data, so `--resume` finds the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lfm.cli.tuning import app
from lfm.core.runs import Run, path_sha256
from lfm.tuning import recipes
from lfm.tuning.adapters import check_adapter_dir
from lfm.tuning.sft import make_instructions

from conftest import make_lm


def _train(model: str, root, *extra: str):
    args = ["train", "--model", model, "--shots", "1", "--steps", "2", "--eval-per-class", "1",
            "--max-chars", "60", "--threads", "1", "--root", str(root), *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _one_line_error(res, text: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and text in lines[0], res.output
    assert "Traceback" not in res.output


def test_train_writes_a_run_that_resumes_with_the_same_command(bbc_lm, tmp_path):
    res = _train(bbc_lm, tmp_path / "runs", "--method", "lora", "--ckpt-every", "1")
    assert res.exit_code == 0, res.output
    assert "lora on" in res.output and "(zero-shot) ->" in res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert check_adapter_dir(run / "tuned" / "adapter") > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["method"] == "lora" and "<function" not in json.dumps(manifest)
    assert manifest["status"] == "done" and {"acc", "zero_shot_acc"} <= set(manifest["metrics"])
    again = _train(
        bbc_lm, tmp_path / "runs", "--method", "lora", "--ckpt-every", "1", "--resume", str(run)
    )
    assert again.exit_code == 0, again.output
    resumed = json.loads((run / "manifest.json").read_text())
    assert len(resumed["resumed"]) == 1 and resumed["status"] == "done"
    assert resumed["metrics"]["acc"] == manifest["metrics"]["acc"]  # the checkpoint's weights
    other = _train(
        bbc_lm, tmp_path / "runs", "--method", "lora", "--seed", "1", "--resume", str(run)
    )
    _one_line_error(other, "holds another config")


@pytest.mark.parametrize("method", ["mezo", "lp-ft", "wise_ft"])
def test_every_trainer_runs_from_the_command_line(bbc_lm, tmp_path, method):
    res = _train(bbc_lm, tmp_path / "runs", "--method", method, "--lr", "1e-3")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith(method.replace("-", "_"))
    assert (run / "tuned" / "model").is_dir() and (run / "tuned" / "result.json").exists()


def test_user_errors_are_one_line_with_status_2(bbc_lm, tmp_path):
    _one_line_error(_train(bbc_lm, tmp_path, "--task", "imdb"), "unknown task 'imdb'")
    _one_line_error(_train(bbc_lm, tmp_path, "--method", "bbt"), "use `lfm tuning bbt`")
    _one_line_error(_train(bbc_lm, tmp_path, "--method", "lorra"), "did you mean 'lora'")
    _one_line_error(_train(str(tmp_path / "nothing"), tmp_path), "no such file or folder")
    _one_line_error(_train(bbc_lm, tmp_path, "--shots", "0"), "shots must be at least 1")
    _one_line_error(_train(bbc_lm, tmp_path, "--batch-size", "0"), "batch_size must be at least 1")
    _one_line_error(_train(bbc_lm, tmp_path, "--steps", "0"), "steps: Input should be greater")
    _one_line_error(
        _train(bbc_lm, tmp_path, "--method", "lp_ft", "--steps", "1"), "at least 2 steps"
    )
    words = CliRunner().invoke(app, ["train", "--model", _plain_lm(tmp_path), "--shots", "1",
                                     "--root", str(tmp_path)])  # fmt: skip
    _one_line_error(words, "share a first token")


def _plain_lm(tmp_path) -> str:
    model, tok = make_lm("llama")
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    return str(tmp_path / "plain")


def test_sft_command_writes_a_run_with_a_peft_adapter(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_instructions(6)))
    args = ["sft", "--model", _plain_lm(tmp_path), "--data", str(data), "--steps", "2", "--lr",
            "1e-2", "--threads", "1"]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--root", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert check_adapter_dir(run / "tuned" / "adapter") > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and "final_loss" in manifest["metrics"]
    loss = manifest["history"]["loss"]  # the curve: one training loss per step
    assert loss["step"] == [1, 2] and loss["value"][-1] == manifest["metrics"]["final_loss"]
    assert (run / "curves.png").stat().st_size > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    _one_line_error(
        CliRunner().invoke(app, [*args[:3], "--data", str(bad)]), "lack a 'prompt' or 'response'"
    )
    missing = CliRunner().invoke(app, [*args[:3], "--data", str(tmp_path / "none.jsonl")])
    _one_line_error(missing, "cannot read instruction rows")
    lp = CliRunner().invoke(app, [*args, "--method", "lp_ft", "--root", str(tmp_path / "r2")])
    _one_line_error(lp, "LP-FT probes a classification head")


def test_the_classify_recipe_runs_from_python(bbc_lm, tmp_path):
    out = recipes.classify("ia3", bbc_lm, shots=1, steps=2, eval_per_class=1, max_chars=60,
                           lr=1e-2, root=tmp_path)  # fmt: skip
    assert out is not None and out["method"] == "ia3" and 0 <= out["acc"] <= 1
    assert out["trainable_parameters"] > 0 and check_adapter_dir(f"{out['run']}/tuned/adapter") > 0
    record = json.loads((tmp_path / out["run"] / "tuned" / "result.json").read_text())
    assert record["config"]["lr"] == 3e-3 and record["verbalizer"]["template"].startswith(
        "Article:"
    )


def test_sft_run_hashes_its_inputs_and_names_the_run_that_made_the_model(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "d.jsonl"
    made = Run("make-model", {}, root=runs)  # the model is an output of an earlier run
    model, tok = make_lm("llama")
    with made.output("model") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    data.write_text("\n".join(json.dumps(r) for r in make_instructions(4)))
    out = recipes.sft("lora", str(made.path / "model"), data=data, steps=1, lr=1e-2, threads=1,
                      root=runs)  # fmt: skip
    assert out is not None
    manifest = json.loads((Path(out["run"]) / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["parents"] == [made.id]
    assert {k: v["sha256"] for k, v in manifest["inputs"].items()} == {
        "model": path_sha256(made.path / "model"), "data": path_sha256(data)
    }  # fmt: skip


def test_dtype_and_device_reach_the_training_and_the_manifest(bbc_lm, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        root = tmp_path / dtype
        res = _train(bbc_lm, root, "--method", "lora", "--device", "cpu", "--dtype", dtype)
        assert res.exit_code == 0, res.output
        (run,) = root.iterdir()
        runs[dtype] = json.loads((run / "manifest.json").read_text())
    # float32 master weights, trained under bfloat16 autocast: other losses than float32's
    want = {"device": "cpu", "dtype": "float32", "autocast": "bfloat16"}
    assert runs["bfloat16"]["placement"] == want
    losses = {k: m["history"]["loss"]["value"] for k, m in runs.items()}
    assert losses["float32"] != losses["bfloat16"]
    _one_line_error(_train(bbc_lm, tmp_path / "x", "--dtype", "int4"), "unknown dtype 'int4'")
