"""The served API's guarantees: levels, keys, limits and malformed bodies, over ASGI (no socket)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from lfm.errors import LfmError
from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.cli import check_bind, is_loopback, make_server
from lfm.serve.wire import pack
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(0)


def _client(lm, level="scores", **kw) -> httpx.AsyncClient:
    app = build_app(Backend(lm, level), ServeSettings(**kw))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _go(coro):
    return asyncio.run(coro)


def _post(lm, path, body, level="scores", headers=None, **kw):
    async def go():
        async with _client(lm, level, **kw) as c:
            return await c.post(path, json=body, headers=headers or {})

    return _go(go())


def test_endpoints_above_the_level_are_forbidden(lm):
    r = _post(
        lm,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 0},
        "text",
    )
    assert r.status_code == 403 and "needs SCORES access" in r.json()["detail"]
    r = _post(lm, "/v1/lfm/embed", {"input": ["hi"]}, "scores")
    assert r.status_code == 403 and "needs EMBEDDINGS" in r.json()["detail"]
    r = _post(lm, "/v1/completions", {"prompt": "The", "max_tokens": 2}, "text")
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


def test_api_key_is_required_when_set(lm):
    body = {"prompt": "The", "max_tokens": 1}
    assert _post(lm, "/v1/completions", body, api_key="s3cret").status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert _post(lm, "/v1/completions", body, headers=bad, api_key="s3cret").status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert _post(lm, "/v1/completions", body, headers=ok, api_key="s3cret").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": 3},
        {"max_tokens": 1},
        {"prompt": "x", "max_tokens": -1},
        {"prompt": "x", "logprobs": -2},
    ],
)
def test_malformed_bodies_are_4xx_with_a_message(lm, body):
    r = _post(lm, "/v1/completions", body)
    assert r.status_code == 422 and r.json()["detail"]


def test_malformed_embeddings_are_4xx_never_5xx(lm):
    e = pack(torch.zeros(1, 3, 32))
    cases = [
        {"embeds": {"data": "!!notb64", "shape": [1, 3, 32]}, "attention_mask": [[1, 1, 1]]},
        {"embeds": {**e, "shape": [1, 3, 31]}, "attention_mask": [[1, 1, 1]]},
        {"embeds": e, "attention_mask": [[1, 1]]},
        {"embeds": e, "attention_mask": [[1, 1, 1]], "positions": [7]},
        {"embeds": pack(torch.zeros(1, 3, 8)), "attention_mask": [[1, 1, 1]]},
        {"embeds": pack(torch.zeros(1, 0, 32)), "attention_mask": [[]]},
    ]
    for body in cases:
        r = _post(lm, "/v1/lfm/logits_from_embeds", body, "embeddings")
        assert 400 <= r.status_code < 500 and r.json()["detail"], body


def test_too_long_inputs_are_413(lm):
    r = _post(lm, "/v1/completions", {"prompt": "word " * 30, "max_tokens": 0}, max_input_tokens=10)
    assert r.status_code == 413 and "exceeds 10" in r.json()["detail"]
    r = _post(lm, "/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 0}, max_items=4)
    assert r.status_code == 413
    r = _post(lm, "/v1/completions", {"prompt": "a" * 500}, max_body_bytes=100)
    assert r.status_code == 413


def test_a_full_queue_answers_429(lm):
    app = build_app(Backend(lm, "scores"), ServeSettings(max_queue=1, max_batch=1))
    slow = app.state.batcher.ops["tokens"]
    app.state.batcher.ops["tokens"] = lambda items, key: (
        __import__("time").sleep(0.3),
        slow(items, key),
    )[1]

    async def go():
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://test") as c:
            body = {"prompt": "The", "max_tokens": 0, "echo": True, "logprobs": 0}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(4)])

    codes = sorted(r.status_code for r in _go(go()))
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}


def test_openapi_and_models_are_served(lm):
    async def go():
        async with _client(lm, "embeddings") as c:
            return (await c.get("/openapi.json")).json(), (await c.get("/v1/models")).json()

    spec, models = _go(go())
    assert "/v1/lfm/logits_from_embeds" in spec["paths"] and "/v1/completions" in spec["paths"]
    assert models["data"][0]["lfm_access"] == "embeddings"


def test_chat_uses_a_template_and_answers(lm):
    body = {"messages": [{"role": "user", "content": "Topic?"}], "max_tokens": 3}
    r = _post(lm, "/v1/chat/completions", body, "text")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_non_loopback_needs_a_key_and_nothing_binds():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(LfmError, match="without an API key"):
        check_bind("0.0.0.0", None)
    with pytest.raises(LfmError, match="without an API key"):
        make_server("smollm2-135m", "scores", "0.0.0.0", 1, None)  # refused before loading
    check_bind("0.0.0.0", "key")  # allowed (not started here)
