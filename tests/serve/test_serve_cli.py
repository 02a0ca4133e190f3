"""The `serve` command function: refuses an unsafe bind before loading anything."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from lfm.serve.cli import serve

app = typer.Typer()
app.command()(serve)


def test_serve_refuses_a_public_host_without_a_key(monkeypatch):
    monkeypatch.delenv("LFM_API_KEY", raising=False)
    res = CliRunner().invoke(app, ["--model", "smollm2-135m", "--host", "0.0.0.0", "--port", "1"])
    assert res.exit_code == 2 and "without an API key" in res.output


def test_serve_refuses_levels_above_embeddings():
    res = CliRunner().invoke(app, ["--model", "smollm2-135m", "--access", "weights"])
    assert res.exit_code == 2 and "--access must be" in res.output


def test_make_server_builds_a_loopback_server_for_a_local_model():
    from lfm.serve.cli import make_server
    from lfm.tuning.tiny import tiny_news_lm as tiny_lm

    server = make_server(tiny_lm(0), "scores", "127.0.0.1", 8123, None, max_batch=4, timeout_s=900)
    assert server.config.host == "127.0.0.1" and server.config.port == 8123
    assert server.config.app.state.backend.level.name == "SCORES"
    assert server.config.app.state.batcher.max_batch == 4
    assert server.config.app.state.settings.timeout_s == 900


def test_serve_refuses_a_timeout_that_is_not_positive():
    res = CliRunner().invoke(app, ["--model", "smollm2-135m", "--timeout-s", "0"])
    assert res.exit_code == 2 and "--timeout-s must be positive" in res.output


def test_top_k_limits_scores_only_and_reaches_the_settings():
    res = CliRunner().invoke(app, ["--model", "smollm2-135m", "--access", "text", "--top-k", "5"])
    assert res.exit_code == 2 and "--top-k limits SCORES access" in res.output
    res = CliRunner().invoke(app, ["--model", "smollm2-135m", "--top-k", "21"])
    assert res.exit_code == 2  # hosted APIs give at most 20

    from lfm.serve.cli import make_server
    from lfm.tuning.tiny import tiny_news_lm as tiny_lm

    server = make_server(tiny_lm(0), "scores", "127.0.0.1", 8124, None, top_k=5)
    assert server.config.app.state.settings.top_k == 5
