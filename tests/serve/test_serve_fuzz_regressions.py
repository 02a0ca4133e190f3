"""Requests the API fuzz run (docs/serve.md, "Fuzzing") turned into 5xx, and their 4xx answers now."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from fuzz_server import tiny_gpt2

from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.wire import pack
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


@pytest.fixture(scope="module")
def gpt2():
    """Absolute positions: a sequence past its 128 positions fails inside the model."""
    return tiny_gpt2()


def _post(lm, path, body=None, raw=None, level="embeddings"):
    app = build_app(Backend(lm, level), ServeSettings())

    async def go():
        t = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=t, base_url="http://test") as c:
            if raw is None:
                return await c.post(path, json=body)
            return await c.post(path, content=raw, headers={"content-type": "application/json"})

    return asyncio.run(go())


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "Paris " * 100, "max_tokens": 1}),
        ("/v1/completions", {"prompt": "Paris " * 100, "max_tokens": 0, "echo": True, "logprobs": 0}),
        ("/v1/completions", {"prompt": "Paris", "max_tokens": 200}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}),
        ("/v1/lfm/next_token_logprobs", {"prompt": ["Paris " * 200]}),
        ("/v1/lfm/embed", {"input": ["Paris " * 200]}),
        ("/v1/lfm/logits_from_embeds",
         {"embeds": pack(torch.zeros(1, 129, 32)), "attention_mask": [[1] * 129]}),
    ],
)  # fmt: skip
def test_sequences_past_the_model_context_are_413(gpt2, path, body):
    r = _post(gpt2, path, body)
    assert r.status_code == 413, r.text
    assert "128" in r.json()["detail"]


def test_sequences_within_the_context_still_run(gpt2):
    r = _post(gpt2, "/v1/completions", {"prompt": "Paris", "max_tokens": 100})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/v1/completions", rb'{"prompt": "a\ud800b", "max_tokens": 1}'),
        ("/v1/completions", rb'{"prompt": ["ok", "\udfff"], "max_tokens": 1}'),
        ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\ud800"}]}'),
        ("/v1/lfm/embed", rb'{"input": ["\ud800"]}'),
        ("/v1/lfm/next_token_logprobs", rb'{"prompt": ["\ud800"]}'),
    ],
)
def test_lone_surrogates_are_422(path, raw):
    r = _post(tiny_lm(0), path, raw=raw)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "seed": 2**70}),
        ("/v1/completions", {"prompt": [], "max_tokens": 0, "echo": True, "logprobs": 0}),
        ("/v1/lfm/logits_from_embeds",
         {"embeds": pack(torch.zeros(1, 2, 32)), "attention_mask": [[2**70, 1]]}),
        ("/v1/lfm/logits_from_embeds",
         {"embeds": pack(torch.zeros(1, 2, 32)), "attention_mask": [[7, 1]]}),
        ("/v1/lfm/logits_from_embeds", {"embeds": {"data": "", "shape": [0, -5]}, "attention_mask": []}),
    ],
)  # fmt: skip
def test_out_of_range_fields_are_422(path, body):
    r = _post(tiny_lm(0), path, body)
    assert r.status_code == 422, r.text


def test_last_position_logits_equal_the_full_logits_at_those_positions():
    from lfm.serve.backend import last_logits

    lm = tiny_lm(0)
    emb, mask = lm.embed(["The team won", "Paris is the capital of France", "Hi"])
    last = mask.sum(1) - 1
    full = lm.logits_from_embeds(emb, mask)  # (B, T, V)
    rows = last_logits(lm, emb, mask, last.tolist())
    assert rows.shape == (3, lm.vocab_size)
    assert torch.allclose(rows, full[torch.arange(3), last], atol=1e-5)
    again = last_logits(lm, emb, mask, [0, 0, 2])  # repeated positions share one column
    assert torch.allclose(again, full[torch.arange(3), torch.tensor([0, 0, 2])], atol=1e-5)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_vanishing_temperature_is_greedy_not_a_500(path):
    lm = tiny_lm(0)
    body = {"max_tokens": 3, "temperature": 1.401298464324817e-45}  # the fuzzer's float
    body |= (
        {"prompt": "hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    r = _post(lm, path, body)
    assert r.status_code == 200, r.text
    greedy = _post(lm, path, {**body, "temperature": 0.0})
    assert r.json()["choices"] == greedy.json()["choices"]
