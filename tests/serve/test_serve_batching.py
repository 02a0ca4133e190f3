"""The model card's `lfm_batching` counters (what a load test reads from outside the server), and
waiting for a server started elsewhere."""

from __future__ import annotations

import asyncio

import httpx

from lfm.serve import Backend, build_app
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


def test_the_card_counts_passes_items_and_requests():
    app = build_app(Backend(tiny_lm(0), "scores"))

    async def go():
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://test") as c:
            before = (await c.get("/v1/models")).json()["data"][0]["lfm_batching"]
            body = {"prompt": ["The", "A"], "max_tokens": 0, "echo": True, "logprobs": 0}
            assert (await c.post("/v1/completions", json=body)).status_code == 200
            return before, (await c.get("/v1/models")).json()["data"][0]["lfm_batching"]

    before, after = asyncio.run(go())
    assert before == {"passes": 0, "items": 0, "requests": 0, "dropped": 0}
    assert after == {"passes": 1, "items": 2, "requests": 1, "dropped": 0}


def test_wait_healthy_returns_for_a_live_server_and_names_a_dead_one(tmp_path):
    import subprocess
    import sys

    import pytest

    from lfm.errors import LfmError
    from lfm.serve.thread import free_port, running, wait_healthy

    with running(build_app(Backend(tiny_lm(0), "text"))) as url:
        wait_healthy(url, timeout_s=5)
    log = tmp_path / "serve.log"
    log.write_text("it broke here")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(LfmError, match="exited with 3: it broke here"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, log, timeout_s=30)
