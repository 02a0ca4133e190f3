"""`lfm meta datafree --resume`: a run killed after a checkpoint, resumed, ends as an uninterrupted
one (weights, loss curve, pool queries, meta-test score) with fewer calls to the pool models; a
resume with other options is one line with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lfm.meta.datafree
from lfm.cli.meta import app
from lfm.core.checkpoints import Checkpoints


class Killed(Exception):
    """The process dying after a checkpoint."""


class PoolCalls:
    """Counts the pool models' calls while meta-learning (white-box: the gradient oracle's
    forward through a pool model; black-box: the SCORES queries) and notes each checkpoint
    written; with `kill` set, the first pool call after a checkpoint raises `Killed`."""

    def __init__(self, monkeypatch, method: str):
        self.calls, self.saved, self.kill = 0, [], False
        white = method == "datafree_whitebox"
        target = lfm.meta.datafree if white else lfm.meta.datafree.CountedScores
        name = "bn_prior" if white else "scores"
        real, write = getattr(target, name), Checkpoints.write

        def call(*args, **kwargs):
            if self.kill and self.saved:
                raise Killed(f"killed after the checkpoint of step {self.saved[-1]}")
            self.calls += 1
            return real(*args, **kwargs)

        def write_and_note(ckpt, step, *args, **kwargs):
            write(ckpt, step, *args, **kwargs)
            self.saved.append(step)

        monkeypatch.setattr(target, name, call)
        monkeypatch.setattr(Checkpoints, "write", write_and_note)

    def reset(self, kill: bool = False) -> None:
        self.calls, self.saved, self.kill = 0, [], kill


def _datafree(args, root):
    return CliRunner().invoke(app, ["datafree", *args, "--root", str(root)])


def _run_dir(root):
    (run,) = list(root.iterdir())
    return run, json.loads((run / "manifest.json").read_text())


def _args(tmp_path, method: str) -> list[str]:
    config = tmp_path / f"{method}.json"
    small = {
        "inv_steps": 2,
        "meta_batch": 2,
        **({"directions": 3} if method == "datafree_blackbox" else {}),
    }
    config.write_text(json.dumps(small))
    return ["--method", method, "--pool", "3", "--pool-steps", "3", "--steps", "4",
            "--ckpt-every", "2", "--test-tasks", "6", "--threads", "1", "--config", str(config)]  # fmt: skip


@pytest.mark.parametrize("method", ["datafree_whitebox", "datafree_blackbox"])
def test_an_interrupted_datafree_run_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, method
):
    args, pool = _args(tmp_path, method), PoolCalls(monkeypatch, method)
    whole = _datafree(args, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    w_run, w = _run_dir(tmp_path / "whole")
    full_calls = pool.calls
    assert pool.saved == [2, 4] and (w_run / "pool.safetensors").is_file()

    pool.reset(kill=True)
    killed = _datafree(args, tmp_path / "runs")
    assert isinstance(killed.exception, Killed), killed.output
    run, m = _run_dir(tmp_path / "runs")
    assert m["status"].startswith("failed") and not (run / "model.safetensors").exists()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 2

    pool.reset()
    resumed = _datafree([*args, "--resume", str(run)], tmp_path / "runs")
    assert resumed.exit_code == 0, resumed.output
    assert pool.saved == [4] and 0 < pool.calls < full_calls  # steps 3 and 4 only
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and len(m["resumed"]) == 1
    a, b = load_file(str(w_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert m["history"]["meta_loss"] == w["history"]["meta_loss"]
    assert m["metrics"]["test_mean"] == w["metrics"]["test_mean"]
    assert m["metrics"].get("pool_queries") == w["metrics"].get("pool_queries")
    if method == "datafree_blackbox":
        assert m["metrics"]["pool_queries"] > 0  # counted before the checkpoint too


def test_resuming_a_datafree_run_with_other_options_is_one_line(tmp_path):
    args = _args(tmp_path, "datafree_whitebox")
    assert _datafree(args, tmp_path / "runs").exit_code == 0
    run, _ = _run_dir(tmp_path / "runs")
    for extra, says in [(["--steps", "5"], "holds another config"),
                        (["--pool-steps", "4"], "other task options (pool_steps)"),
                        (["--method", "datafree_blackbox"], "not meta-datafree_blackbox")]:  # fmt: skip
        res = _datafree([*args, *extra, "--resume", str(run)], tmp_path / "runs")
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and says in lines[0], res.output
    res = _datafree([*args, "--resume", str(tmp_path / "nowhere")], tmp_path / "runs")
    assert res.exit_code == 2 and "is not a run directory" in res.output
