"""`lfm tuning bbt --resume` and `prompt-search --resume`: a run killed after its evaluation log was
written, resumed, replays the logged evaluations and ends as an uninterrupted run with fewer model
calls; CMA-ES's candidates depend on the seed alone; a log that does not replay, or a resume with
other options, is one line with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lfm.tuning.bbt
import lfm.tuning.prompt_search
from lfm.access import narrow
from lfm.cli.tuning import app
from lfm.tuning.bbt import BBTConfig, bbt
from lfm.tuning.replay import LOG, ReplayLog
from lfm.tuning.tiny import tiny_news_lm, tiny_task

LABELS = ("business", "politics", "sport")  # single tokens of the `bbc_lm` tokenizer
# each command, the model call it makes per evaluation, and its options (BBT: a start and
# generations of 20, the last cut to the budget; prompt search: 2 candidates per step)
COMMANDS = {
    "bbt": (lfm.tuning.bbt, "last_logits", ["--budget", "45", "--n-tokens", "2", "--dim", "4"]),
    "prompt-search": (lfm.tuning.prompt_search, "class_scores",
                      ["--iterations", "4", "--candidates", "2"]),
}  # fmt: skip


class Killed(Exception):
    """The process dying after its evaluation log was written."""


class ModelCalls:
    """Counts the model calls of a search and notes each write of its evaluation log; with `kill`
    set, the first model call after a write raises `Killed`."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls, self.written, self.kill = 0, [], False
        real, flush = getattr(module, name), ReplayLog.flush

        def call(*args, **kwargs):
            if self.kill and self.written:
                raise Killed(f"killed after {self.written[-1]} evaluations were logged")
            self.calls += 1
            return real(*args, **kwargs)

        def flush_and_note(log):
            before = log._written
            flush(log)
            if log._written > before:
                self.written.append(log._written)

        monkeypatch.setattr(module, name, call)
        monkeypatch.setattr(ReplayLog, "flush", flush_and_note)

    def reset(self, kill: bool = False) -> None:
        self.calls, self.written, self.kill = 0, [], kill


def _data(tmp_path) -> str:
    rows = [{"text": f"{lab} news item {i}: the {lab} story", "label": lab}
            for i in range(5) for lab in LABELS]  # fmt: skip
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _args(command: str, model: str, data: str, *extra: str) -> list[str]:
    return [command, "--model", model, "--data", data, "--shots", "2", "--max-chars", "60",
            "--threads", "1", *COMMANDS[command][2], *extra]  # fmt: skip


def _invoke(args, root):
    return CliRunner().invoke(app, [*args, "--root", str(root)])


def _run_dir(root):
    (run,) = list(root.iterdir())
    return run, json.loads((run / "manifest.json").read_text())


def _result(res) -> dict:
    out = json.loads(res.stdout)
    out.pop("run")
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_interrupted_search_resumes_by_replay_to_the_uninterrupted_result(
    bbc_lm, tmp_path, monkeypatch, command
):
    module, name, _ = COMMANDS[command]
    args, model = _args(command, bbc_lm, _data(tmp_path)), ModelCalls(monkeypatch, module, name)
    whole = _invoke(args, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    w_run, w = _run_dir(tmp_path / "whole")
    full_calls, logged = model.calls, json.loads((w_run / LOG).read_text())
    assert len(model.written) >= 2 and len(logged) == _result(whole)["evaluations"] == full_calls

    model.reset(kill=True)
    killed = _invoke(args, tmp_path / "runs")
    assert isinstance(killed.exception, Killed), killed.output
    run, m = _run_dir(tmp_path / "runs")
    assert m["status"].startswith("failed") and not (run / "result").exists()
    cut = model.written[0]  # the evaluations logged before the kill
    assert json.loads((run / LOG).read_text()) == logged[:cut]

    model.reset()
    resumed = _invoke([*args, "--resume", str(run)], tmp_path / "runs")
    assert resumed.exit_code == 0, resumed.output
    assert model.calls == full_calls - cut > 0  # the logged ones were replayed, not called
    assert _result(resumed) == _result(whole)  # best loss or score, evaluations, history, stop
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and len(m["resumed"]) == 1 and m["history"] == w["history"]
    assert json.loads((run / LOG).read_text()) == logged
    if command == "bbt":
        a, b = (
            load_file(str(w_run / "result" / "prompt.safetensors")),
            load_file(str(run / "result" / "prompt.safetensors")),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        template = (w_run / "result" / "template.json").read_text()
        assert (run / "result" / "template.json").read_text() == template


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_resume_that_cannot_replay_or_has_other_options_is_one_line(bbc_lm, tmp_path, command):
    args = _args(command, bbc_lm, _data(tmp_path))
    assert _invoke(args, tmp_path / "runs").exit_code == 0
    run, _ = _run_dir(tmp_path / "runs")
    other = _invoke([*args, "--seed", "1", "--resume", str(run)], tmp_path / "runs")
    _one_line_error(other, "holds another config")
    logged = json.loads((run / LOG).read_text())
    logged[3]["hash"] = "0" * 16  # another candidate than the search asks for
    (run / LOG).write_text(json.dumps(logged))
    tampered = _invoke([*args, "--resume", str(run)], tmp_path / "runs")
    _one_line_error(tampered, "evaluation 4 asks another candidate")
    nowhere = _invoke([*args, "--resume", str(tmp_path / "nowhere")], tmp_path / "runs")
    _one_line_error(nowhere, "is not a run directory")


def _one_line_error(res, text: str) -> None:
    """Exit status 2 and one error line (after the progress of a replay that got going)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("[lfm]") and "it/s]" not in ln]
    assert res.exit_code == 2 and len(errors) == 1 and text in errors[0], res.output
    assert "Traceback" not in res.output


def test_cma_candidates_depend_on_the_seed_alone(monkeypatch):
    handle, task = narrow(tiny_news_lm(0), "embeddings"), tiny_task()
    cfg = BBTConfig(n_tokens=2, intrinsic_dim=4, popsize=4, budget=13)

    def candidates(seed: int) -> list[str]:
        log = ReplayLog()
        bbt(handle, task, cfg, seed=seed, log=log)
        return [d["hash"] for d in log.done]

    np.random.seed(7)
    outside = np.random.get_state()
    first = candidates(3)
    assert len(first) == 13 and len(set(first)) == 13
    after = np.random.get_state()  # the caller's NumPy generator is left as it was
    assert np.array_equal(outside[1], after[1]) and outside[2:] == after[2:]
    real = lfm.tuning.bbt.last_logits

    def drawing_model(*args, **kwargs):  # a model that draws from NumPy's global generator
        np.random.rand(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(lfm.tuning.bbt, "last_logits", drawing_model)
    np.random.seed(11)
    assert candidates(3) == first
    assert candidates(4) != first
    assert candidates(-1) == candidates(-1)  # `cma` would read its seed 0 as "from the clock"
