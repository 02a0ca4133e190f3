"""Bounded runs against a tiny served model: 32 clients at once, and a fuzz of the OpenAPI spec
(schemathesis): no 5xx, and `/health` answering quickly throughout."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.serve.wire import pack
from lfm.tuning.tiny import tiny_news_lm as tiny_lm

pytestmark = pytest.mark.slow


def _bodies(i: int) -> list[tuple[str, dict]]:
    import torch

    text = f"Article {i}: the team won the match. " * (1 + i % 8)
    return [
        ("/v1/completions", {"prompt": [text] * (1 + i % 4), "max_tokens": 0, "echo": True,
                             "logprobs": 5}),
        ("/v1/completions", {"prompt": text, "max_tokens": 4}),
        ("/v1/lfm/next_token_logprobs", {"prompt": [text] * (1 + i % 16)}),
        ("/v1/lfm/embed", {"input": [text]}),
        ("/v1/lfm/logits_from_embeds", {"embeds": pack(torch.zeros(2, 5, 32)),
                                        "attention_mask": [[1] * 5] * 2, "positions": [4, 2]}),
        ("/v1/completions", {"prompt": "x" * 200_000, "max_tokens": 0}),  # refused: 413
    ]  # fmt: skip


def test_32_clients_get_no_5xx_and_health_stays_fast():
    app = build_app(Backend(tiny_lm(0), "embeddings"), ServeSettings(max_queue=64))
    codes: list[int] = []
    latency: list[float] = []
    stop = threading.Event()
    with running(app) as url:

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for k in range(6):
                    path, body = _bodies(i + k)[(i + k) % 6]
                    codes.append(c.post(path, json=body).status_code)

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert c.get("/health").status_code == 200
                    latency.append(time.monotonic() - t0)
                    time.sleep(0.05)

        watcher = threading.Thread(target=probe)
        watcher.start()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(client, range(32)))
        stop.set()
        watcher.join()
    assert len(codes) == 32 * 6 and max(codes) < 500, sorted(set(codes))
    assert 200 in codes and 413 in codes
    assert statistics.median(latency) < 0.1 and max(latency) < 1.0, max(latency)


@pytest.mark.parametrize("level", ["text", "scores", "embeddings"])
def test_a_fuzz_of_the_openapi_spec_gets_no_5xx(level):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    app = build_app(Backend(tiny_lm(0), level), ServeSettings())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: list[int] = []
    for found in schema.get_all_operations():
        operation = found.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)  # fmt: skip
        def check(case):
            response = case.call()
            seen.append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        check()
    assert len(seen) >= 7 * 10 and any(400 <= s < 500 for s in seen)
