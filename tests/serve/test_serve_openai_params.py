"""Every OpenAI parameter a completion or chat body may carry is honoured (`stop`, `n`, `top_p`)
or refused with a 422 that names it; a field OpenAI does not define is refused too. A top-k server
never gives more than K alternatives per token, nor anything above SCORES."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfm.serve import Backend, ServeSettings, build_app
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(0)


def _post(lm, path, body, level="scores"):
    async def go():
        app = build_app(Backend(lm, level), ServeSettings())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


def _texts(r) -> list[str]:
    assert r.status_code == 200, r.text
    return [c.get("text", c.get("message", {}).get("content")) for c in r.json()["choices"]]


COMPLETION = {"prompt": "The", "max_tokens": 6}
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}


@pytest.mark.parametrize(("path", "base"), [("/v1/completions", COMPLETION),
                                            ("/v1/chat/completions", CHAT)])  # fmt: skip
def test_stop_cuts_the_text_before_the_first_stop(lm, path, base):
    full = _texts(_post(lm, path, base))[0]
    assert len(full) > 3
    stop = full[2:4]  # a piece of what greedy decoding writes
    r = _post(lm, path, {**base, "stop": [stop, "\u2603never"]})
    assert _texts(r) == [full[: full.find(stop)]]
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = _post(lm, path, {**base, "stop": "\u2603never"})
    assert _texts(r) == [full] and r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("path", "base"), [("/v1/completions", COMPLETION),
                                            ("/v1/chat/completions", CHAT)])  # fmt: skip
def test_n_gives_n_choices_that_sample_apart(lm, path, base):
    greedy = _texts(_post(lm, path, {**base, "n": 3}))
    assert len(greedy) == 3 and len(set(greedy)) == 1  # greedy: three equal choices
    r = _post(lm, path, {**base, "n": 4, "temperature": 1.5, "seed": 3})
    sampled = _texts(r)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert len(set(sampled)) > 1  # one seed, four different draws


def test_n_choices_of_several_prompts_come_in_prompt_order(lm):
    body = {"prompt": ["The", "A news"], "max_tokens": 3, "n": 2}
    texts = _texts(_post(lm, "/v1/completions", body))
    one = _texts(_post(lm, "/v1/completions", {"prompt": "The", "max_tokens": 3}))[0]
    two = _texts(_post(lm, "/v1/completions", {"prompt": "A news", "max_tokens": 3}))[0]
    assert texts == [one, one, two, two]


def test_top_p_is_honoured(lm):
    body = {**COMPLETION, "temperature": 2.0, "max_tokens": 8}
    greedy = _texts(_post(lm, "/v1/completions", COMPLETION | {"max_tokens": 8}))
    # a nucleus of almost no mass keeps only the most likely token: greedy, at any temperature
    for seed in (1, 2, 3):
        assert _texts(_post(lm, "/v1/completions", {**body, "top_p": 1e-6, "seed": seed})) == greedy
    wide = {tuple(_texts(_post(lm, "/v1/completions", {**body, "seed": s}))) for s in (1, 2, 3)}
    assert wide != {tuple(greedy)}  # while the full distribution samples away from it


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "stream", True),
        ("/v1/completions", "presence_penalty", 0.5),
        ("/v1/completions", "frequency_penalty", -1.0),
        ("/v1/completions", "logit_bias", {"50": 10}),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "suffix", "end"),
        ("/v1/chat/completions", "tools", [{"type": "function"}]),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "stream", True),
        ("/v1/completions", "top_k", 5),  # not an OpenAI field
        ("/v1/chat/completions", "repetition_penalty", 1.2),
    ],
)
def test_parameters_lfm_would_not_honour_are_422_naming_them(lm, path, field, value):
    base = COMPLETION if path == "/v1/completions" else CHAT
    r = _post(lm, path, {**base, field: value})
    assert r.status_code == 422, r.text
    assert field in r.text


@pytest.mark.parametrize(("field", "value"), [("stream", False), ("presence_penalty", 0),
                                              ("logit_bias", {}), ("best_of", 1), ("user", "u1")])  # fmt: skip
def test_no_op_values_of_those_parameters_are_accepted(lm, field, value):
    assert _post(lm, "/v1/completions", {**COMPLETION, field: value}).status_code == 200


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], 3])
def test_bad_stops_are_422(lm, stop):
    assert _post(lm, "/v1/completions", {**COMPLETION, "stop": stop}).status_code == 422


# -- the top-k tier of hosted APIs (`lfm serve --access scores --top-k K`) --


def _post_k(lm, path, body, k):
    async def go():
        app = build_app(Backend(lm, "scores"), ServeSettings(top_k=k))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await (c.get(path) if body is None else c.post(path, json=body))

    return asyncio.run(go())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    k=st.integers(0, 6),
    logprobs=st.integers(0, 20),
    echo=st.booleans(),
    max_tokens=st.integers(0, 3),
    prompt=st.text(st.sampled_from("abcde fgh."), min_size=1, max_size=12).filter(str.strip),
)
def test_a_top_k_server_never_gives_more_than_k(lm, k, logprobs, echo, max_tokens, prompt):
    body = {"prompt": prompt, "max_tokens": max_tokens, "echo": echo or max_tokens == 0,
            "logprobs": logprobs}  # fmt: skip
    r = _post_k(lm, "/v1/completions", body, k)
    if logprobs > k:
        assert r.status_code == 403 and f"top {k} log-probabilities" in r.text
        return
    assert r.status_code == 200, r.text
    assert r.json()["lfm_top_k"] == k  # recorded in every result
    for choice in r.json()["choices"]:
        tops = choice["logprobs"]["top_logprobs"]
        assert all(t is None or len(t) <= k for t in tops or [])
        # as many alternatives as asked, up to K; fewer only where two token ids decode to one
        # string (the answer is keyed by text, as OpenAI's is)
        if logprobs:
            assert all(1 <= len(t) <= min(logprobs, k) for t in tops or [] if t is not None)


def test_a_top_k_server_refuses_the_full_row_and_everything_above_scores(lm):
    r = _post_k(lm, "/v1/lfm/next_token_logprobs", {"prompt": ["The"]}, 5)
    assert r.status_code == 403 and "top 5" in r.text
    assert _post_k(lm, "/v1/lfm/embed", {"input": ["The"]}, 5).status_code == 403
    assert _post_k(lm, "/v1/models", None, 5).json()["data"][0]["lfm_top_k"] == 5
    # continuations are still scored (echo), which is what hosted APIs give
    body = {"prompt": "The news", "max_tokens": 0, "echo": True, "logprobs": 0}
    r = _post_k(lm, "/v1/completions", body, 5)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["token_logprobs"][1] < 0
