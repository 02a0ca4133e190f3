"""What no request may do to the server: outgrow its body, token and memory budgets, hold the
event loop or the worker, hold a connection, or read the spec and paths without the key."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

from lfm.serve import Backend, ServeSettings, batcher, build_app
from lfm.serve.batcher import Stopped, check_stop
from lfm.serve.thread import running
from lfm.tuning.tiny import tiny_news_lm as tiny_lm

ECHO = {"max_tokens": 0, "echo": True, "logprobs": 0}


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(0)


def _app(lm, level="scores", **kw):
    return build_app(Backend(lm, level), ServeSettings(**kw))


def _ask(app, *calls):
    """Run request coroutines `call(client)` together against `app`; their responses in order."""

    async def go():
        t = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=t, base_url="http://test", timeout=30) as c:
            return await asyncio.gather(*[call(c) for call in calls])

    return asyncio.run(go())


def _post(path, body, headers=None):
    return lambda c: c.post(path, json=body, headers=headers or {})


# -- the body limit counts the bytes that arrive ------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413_before_it_is_all_read(lm):
    sent = []

    async def chunks():  # no Content-Length: the body is sent chunked
        for _ in range(1000):
            sent.append(1)
            yield b'{"prompt": "' + b"a" * 1000

    app = _app(lm, max_body_bytes=10_000)
    (r,) = _ask(app, lambda c: c.post("/v1/completions", content=chunks()))
    assert r.status_code == 413 and "exceeds 10000" in r.json()["detail"]
    assert len(sent) <= 12  # the rest of the megabyte was never asked for


def test_a_body_slower_than_its_deadline_is_408(lm):
    async def trickle():
        yield b'{"prompt": '
        await asyncio.sleep(1.0)
        yield b'"hi", "max_tokens": 1}'

    app = _app(lm, body_timeout_s=0.3)
    (r,) = _ask(app, lambda c: c.post("/v1/completions", content=trickle()))
    assert r.status_code == 408 and "0.3 s" in r.json()["detail"]


# -- texts: characters before tokens, tokens before memory --------------------------------------


def test_a_text_too_long_in_characters_is_refused_untokenised(lm):
    backend = Backend(lm, "scores")
    calls = []
    backend.n_tokens = lambda text: calls.append(text) or 1  # type: ignore[method-assign]
    app = build_app(backend, ServeSettings(max_input_tokens=10))
    bound = 10 * backend.chars_per_token
    (r,) = _ask(app, _post("/v1/completions", {"prompt": "a" * (bound + 1), **ECHO}))
    assert r.status_code == 413 and f"exceeds {bound}" in r.json()["detail"]
    assert calls == []
    (r,) = _ask(app, _post("/v1/completions", {"prompt": "a" * bound, **ECHO}))
    assert r.status_code == 200 and calls == ["a" * bound]


def test_chars_per_token_bounds_every_token_of_the_vocabulary(lm):
    backend = Backend(lm, "scores")
    tok = lm.tokenizer
    longest = max(len(tok.decode([i])) for i in range(len(tok)))
    assert backend.chars_per_token >= max(16, longest)


def test_an_item_over_the_pass_budget_is_413_before_running(lm):
    app = _app(lm, max_pass_bytes=100_000)
    ran = []
    app.state.batcher.ops["tokens"] = lambda items, key: ran.append(items) or []
    (r,) = _ask(app, _post("/v1/completions", {"prompt": "The team won the match " * 8, **ECHO}))
    assert r.status_code == 413 and "in one pass" in r.json()["detail"] and ran == []
    assert "\n" not in r.json()["detail"]


def test_an_answer_over_the_request_budget_is_413(lm):
    app = _app(lm, max_request_bytes=50_000)  # 20 rows of 320 floats are about 100 kB
    body = {"prompt": ["The team won the match"] * 20}
    (r,) = _ask(app, _post("/v1/lfm/next_token_logprobs", body))
    assert r.status_code == 413 and "per request" in r.json()["detail"]
    (r,) = _ask(app, _post("/v1/lfm/next_token_logprobs", {"prompt": body["prompt"][:2]}))
    assert r.status_code == 200


def test_passes_are_split_to_the_pass_budget_with_the_same_answer(lm):
    texts = [f"Article {i}: the team won the match." for i in range(8)]
    whole = _app(lm)
    (full,) = _ask(whole, _post("/v1/completions", {"prompt": texts, **ECHO}))
    width = max(len(lm.tokenizer(t)["input_ids"]) for t in texts)
    split = _app(lm, max_pass_bytes=whole.state.backend.pass_bytes("tokens", 0, 2, width))
    (r,) = _ask(split, _post("/v1/completions", {"prompt": texts, **ECHO}))
    assert r.status_code == 200 and full.status_code == 200
    assert max(split.state.batcher.stats.sizes) <= 2 and split.state.batcher.stats.passes >= 4
    assert whole.state.batcher.stats.passes == 1
    got = [x for c in r.json()["choices"] for x in c["logprobs"]["token_logprobs"][1:]]
    want = [x for c in full.json()["choices"] for x in c["logprobs"]["token_logprobs"][1:]]
    assert got == pytest.approx(want, abs=1e-5)


def test_echo_logprobs_equal_a_log_softmax_reference(lm):
    import torch

    (r,) = _ask(
        _app(lm), _post("/v1/completions", {"prompt": "The team won", **ECHO, "logprobs": 3})
    )
    lp = r.json()["choices"][0]["logprobs"]
    ids = torch.tensor([lp["token_ids"]])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
    want = [float(ref[t - 1, ids[0, t]]) for t in range(1, ids.shape[1])]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    top = ref[0].topk(3).values.tolist()
    assert sorted(lp["top_logprobs"][1].values(), reverse=True) == pytest.approx(top, abs=1e-5)


# -- nobody holds the event loop or the worker --------------------------------------------------


def test_tokenising_does_not_block_the_event_loop(lm):
    backend = Backend(lm, "scores")
    backend.n_tokens = lambda text: time.sleep(1.0) or 3  # type: ignore[method-assign]
    app = build_app(backend, ServeSettings())

    async def health_later(c):
        await asyncio.sleep(0.2)  # the slow request is tokenising by now
        t0 = time.monotonic()
        r = await c.get("/health")
        return r, time.monotonic() - t0

    slow, (health, waited) = _ask(app, _post("/v1/completions", {"prompt": "x", **ECHO}),
                                  health_later)  # fmt: skip
    assert health.status_code == 200 and waited < 0.5
    assert slow.status_code == 200


def _slow_tokens(app, seconds):
    calls = []
    fast = app.state.batcher.ops["tokens"]

    def op(items, key):
        calls.append(len(items))
        time.sleep(seconds)
        return fast(items, key)

    app.state.batcher.ops["tokens"] = op
    return calls


def test_a_timed_out_request_stops_running_and_frees_the_worker(lm):
    app = _app(lm, max_batch=1, timeout_s=0.5)
    calls = _slow_tokens(app, 0.2)

    async def next_one(c):
        await asyncio.sleep(0.8)  # after the first one's 504
        t0 = time.monotonic()
        r = await c.post("/v1/completions", json={"prompt": "Shares", **ECHO})
        return r, time.monotonic() - t0

    big, (small, waited) = _ask(app, _post("/v1/completions", {"prompt": ["The team"] * 20, **ECHO}),
                                next_one)  # fmt: skip
    assert big.status_code == 504 and small.status_code == 200 and waited < 0.6
    stats = app.state.batcher.stats
    assert sum(calls) <= 6 and stats.dropped + stats.stopped == 1  # not the 20 passes


def test_a_timed_out_pass_stops_between_its_pieces(lm):
    app = _app(lm, timeout_s=0.3)
    ran = []

    def op(items, key):  # one pass of 20 items that checks the flag between them
        for it in items:
            check_stop()
            ran.append(it)
            time.sleep(0.1)
        return [None] * len(items)

    app.state.batcher.ops["tokens"] = op

    async def next_one(c):
        await asyncio.sleep(0.6)
        return await c.get("/health")

    r, _ = _ask(app, _post("/v1/completions", {"prompt": ["The team"] * 20, **ECHO}), next_one)
    assert r.status_code == 504 and app.state.batcher.stats.passes == 1
    assert app.state.batcher.stats.stopped == 1
    assert len(ran) <= 6  # not the 20 items of the pass


@pytest.mark.parametrize("op", ["tokens", "next", "generate"])
def test_backend_operations_check_the_stop_flag(lm, op):
    backend = Backend(lm, "scores")
    key = {"tokens": 0, "next": None, "generate": (2, 0.0, 0, 1.0)}[op]
    flag = threading.Event()
    token = batcher._stop.set(flag)
    try:
        assert len(backend.ops()[op](["The team"], key)) == 1
        flag.set()
        with pytest.raises(Stopped):
            backend.ops()[op](["The team"], key)
    finally:
        batcher._stop.reset(token)


def test_a_small_request_does_not_wait_behind_a_large_one(lm):
    app = _app(lm, max_batch=1)
    _slow_tokens(app, 0.1)
    done = {}

    def timed(name, body, delay=0.0):
        async def call(c):
            await asyncio.sleep(delay)
            r = await c.post("/v1/completions", json=body)
            done[name] = time.monotonic()
            return r

        return call

    big = timed("big", {"prompt": ["The team"] * 20, **ECHO})
    small = timed("small", {"prompt": "Shares", **ECHO}, delay=0.3)
    rb, rs = _ask(app, big, small)
    assert rb.status_code == rs.status_code == 200
    assert done["big"] - done["small"] > 1.0  # the small one ran between the big one's passes


# -- connections --------------------------------------------------------------------------------


def test_a_connection_trickling_its_headers_is_closed(lm):
    app = _app(lm, header_timeout_s=0.5)
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            t0 = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server
            assert time.monotonic() - t0 < 3
        assert httpx.get(url + "/health").status_code == 200  # a whole request still works


def test_connections_over_the_limit_get_503(lm):
    app = _app(lm, max_connections=2, header_timeout_s=5)
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            time.sleep(0.2)
            assert httpx.get(url + "/health").status_code == 503
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200


# -- keys and what answers show -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_the_spec_and_its_viewers_need_the_key(lm, path):
    app = _app(lm, api_key="s3cret")
    no, yes = _ask(app, lambda c: c.get(path),
                   lambda c: c.get(path, headers={"Authorization": "Bearer s3cret"}))  # fmt: skip
    assert no.status_code == 401 and yes.status_code == 200
    (open_,) = _ask(_app(lm), lambda c: c.get(path))  # without a key, served as before
    assert open_.status_code == 200


@pytest.mark.parametrize(
    "header, status",
    [("s3cret", 401), ("Token s3cret", 401), ("Bearer", 401), ("Bearer s3cret", 200),
     ("bearer s3cret", 200), ("BEARER  s3cret ", 200), ("Bearer wrong", 401)],
)  # fmt: skip
def test_the_bearer_scheme_is_required_in_any_case(lm, header, status):
    app = _app(lm, api_key="s3cret")
    (r,) = _ask(app, lambda c: c.get("/v1/models", headers={"Authorization": header}))
    assert r.status_code == status


def test_no_local_path_in_any_answer():
    from lfm.access import LocalModel

    tiny = tiny_lm(0)
    where = "/home/someone/models/tiny-news"
    app = build_app(Backend(LocalModel(tiny.model, tiny.tokenizer, name=where), "scores"))
    models, spec, done = _ask(app, lambda c: c.get("/v1/models"), lambda c: c.get("/openapi.json"),
                              _post("/v1/completions", {"prompt": "The", "max_tokens": 1}))  # fmt: skip
    assert models.json()["data"][0]["id"] == "tiny-news"
    for r in (models, spec, done):
        assert r.status_code == 200 and "/home/someone" not in r.text
