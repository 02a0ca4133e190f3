"""The `lfm` command line."""

from __future__ import annotations

import json
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
    res = runner.invoke(app, ["info", str(tmp_path / "m"), "--dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["dtype"] == "bfloat16"  # loaded as asked
    res = runner.invoke(app, ["info", str(tmp_path / "m"), "--json"])
    assert json.loads(res.output)["dtype"] == "float32"  # and only for that command


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
        (["edit", "apply", "--model", "m", "-m", "teleport", "--prompt", "A is", "--subject", "A",
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


# ---- option errors of every group: exit status 2, no traceback, at most two error lines ----


def _main(argv, monkeypatch, capsys) -> tuple[int, str]:
    """Run the `lfm` entry point in this process (as `python -m lfm` does); (status, stderr)."""
    import lfm.cli

    monkeypatch.setattr(sys, "argv", ["lfm", *argv])
    with pytest.raises(SystemExit) as done:
        lfm.cli.main()
    return done.value.code, capsys.readouterr().err


def _assert_usage_error(code: int, stderr: str, says: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr and says in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith(("Usage:", "Try "))]
    assert 1 <= len(lines) <= 2, stderr
    assert sum(x.lower().startswith("error") for x in lines) == 1, stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        # a bad value, a bad type, a missing file; then the values a range lets through
        (["tuning", "sft", "--steps", "0"], "steps: Input should be greater"),
        (["tuning", "train", "--shots", "many"], "--shots"),
        (["tuning", "sft", "--data", "no-such.jsonl"], "no-such.jsonl"),
        (["tuning", "sft", "--lr", "nan"], "--lr"),
        (["tuning", "sft", "--batch-size", "0"], "batch_size must be at least 1"),
        (["tuning", "train", "--threads", "0"], "--threads"),
        (["tuning", "bbt", "--budget", "-5"], "--budget"),
        (["tuning", "augment", "--corpus", "no-such.txt"], "no-such.txt"),
        (["tuning", "classify", "--text", "x"], "--run"),
        (["tuning", "classify", "--run", "no-such-run", "--text", "x"], "not a run directory"),
        (["tuning", "augment", "--calls", "0"], "--calls"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_tuning_option_errors(argv, says, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(*_main(argv, monkeypatch, capsys), says)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "holds no instruction rows"),
        ("{not json\n", "cannot read instruction rows"),
        ('{"prompt": "Hi"}\n', "lack a 'prompt' or 'response'"),
        ('{"prompt": "Hi", "response": 3}\n', "must be text"),
        ("[1, 2]\n", "every line must be a JSON object"),
    ],
)
def test_tuning_sft_refuses_a_bad_data_file_before_loading_a_model(
    content, says, monkeypatch, capsys, tmp_path
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(content)
    argv = ["tuning", "sft", "--model", "no-such-model", "--data", "data.jsonl"]
    _assert_usage_error(*_main(argv, monkeypatch, capsys), says)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["distill", "vision", "--student-steps", "0"], "--student-steps"),
        (["distill", "lm", "--every", "half"], "--every"),
        (["distill", "lm", "--model", "./no/such/teacher"], "no such file or folder"),
        (["distill", "vision", "--lr", "inf"], "not a finite number"),
        (["distill", "datafree", "--batch-size", "1"], "--batch-size"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_distill_option_errors(argv, says, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(*_main(argv, monkeypatch, capsys), says)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["meta", "train", "--shots", "0"], "shots must be at least 1"),
        (["meta", "train", "--ways", "five"], "--ways"),
        (["meta", "train", "--config", "no-such.yaml"], "cannot read config"),
        (["meta", "train", "--steps", "-3"], "steps must be at least 0"),
        (["meta", "datafree", "--pool", "0"], "pool must be at least 1"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_meta_option_errors(argv, says, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(*_main(argv, monkeypatch, capsys), says)


def test_meta_config_values_out_of_range_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("inner_lr: -0.5\nouter_lr: .nan\n")
    code, stderr = _main(["meta", "train", "--config", "cfg.yaml"], monkeypatch, capsys)
    _assert_usage_error(code, stderr, "outer_lr")


EDIT = ["edit", "apply", "--model", "m", "--prompt", "A is", "--subject", "A", "--target", "B",
        "-o", "p.st"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["edit", "trace", "--model", "m", "--prompt", "A is", "--subject", "A", "--samples", "0",
          "-o", "t.png"], "--samples"),
        (["edit", "eval", "p.st", "--model", "m", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["edit", "apply", "--model", "m", "--requests", "no-such.jsonl", "-o", "p.st"],
         "no-such.jsonl"),
        (["edit", "trace", "--model", "m", "--prompt", "A is", "--subject", "A", "--noise", "nan",
          "-o", "t.png"], "--noise"),
        ([*EDIT, "--config", "no-such.yaml"], "no-such.yaml"),
    ],
    ids=lambda v: " ".join(v[:3]) + " " + v[-3] if isinstance(v, list) else None,
)  # fmt: skip
def test_edit_option_errors(argv, says, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(*_main(argv, monkeypatch, capsys), says)


@pytest.mark.parametrize(
    ("yaml", "says"),
    [
        ("v_steps: -5\n", "v_steps"),
        ("stats_tokens: 0\n", "stats_tokens"),
        ("clamp_norm: .inf\n", "clamp_norm"),
    ],
)
def test_edit_config_out_of_range_is_refused_before_any_patch(yaml, says, monkeypatch, capsys,
                                                              tmp_path):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(yaml)
    code, stderr = _main([*EDIT, "--config", "cfg.yaml"], monkeypatch, capsys)
    _assert_usage_error(code, stderr, says)
    assert not (tmp_path / "p.st").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["generate", "Paris is", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "Paris is", "--temperature", "warm"], "--temperature"),
        (["generate", "Paris is", "--model", "./no/such/model"], "no such file or folder"),
        (["generate", "Paris is", "--temperature", "inf"], "--temperature"),
        # the other top-level commands and groups: a bad option, a bad type, a missing file
        (["plan", "smollm2-135m", "--size", "x"], "--size"),
        (["plan", "smollm2-13m"], "did you mean 'smollm2-135m'?"),
        (["plan", "smollm2-135m", "--task", "clasify"], "did you mean 'classify'?"),
        (["run", "no-such.yaml"], "does not exist"),
        (["run", "no-such.yaml", "--chek"], "No such option"),
        (["cache", "--clear=1"], "does not take a value"),
        (["runs", "show", "no-such-run"], "no run 'no-such-run'"),
        (["runs", "show", "x", "--json=maybe"], "does not take a value"),
        (["runs", "list", "--rooot", "x"], "No such option"),
        (["serve", "--port", "abc"], "--port"),
        (["serve", "--acess", "scores"], "No such option"),
        (["info", "smollm2-13m"], "did you mean 'smollm2-135m'?"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_top_level_option_errors(argv, says, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _assert_usage_error(*_main(argv, monkeypatch, capsys), says)


def test_generate_refuses_a_prompt_past_the_context(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    model, tok = make_lm("gpt2")  # absolute positions: 128 of them
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # the save's progress bar
    long = " ".join(["Paris"] * 200)
    argv = ["generate", long, "--model", str(tmp_path / "m"), "--max-new-tokens", "3"]
    code, stderr = _main(argv, monkeypatch, capsys)
    _assert_usage_error(code, stderr, "past the model's context of 128 tokens")
    code, stderr = _main(["generate", "  ", "--model", str(tmp_path / "m")], monkeypatch, capsys)
    _assert_usage_error(code, stderr, "the prompt is empty")
    # within the context it still generates
    argv = ["generate", "Paris is", "--model", str(tmp_path / "m"), "--max-new-tokens", "3"]
    code, _ = _main(argv, monkeypatch, capsys)
    assert code == 0
