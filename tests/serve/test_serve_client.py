"""The client's retries, cache and budget, over a scripted transport (no server)."""

from __future__ import annotations

import httpx
import pytest

from lfm.errors import LfmError
from lfm.serve import Budget, BudgetExceeded, RemoteModel


def _echo(text: str) -> dict:
    lp = {"tokens": ["<bos>", text], "token_logprobs": [None, -1.5], "top_logprobs": None,
          "text_offset": [0, 0], "text_end": [0, 99], "token_ids": [0, 5]}  # fmt: skip
    return {"choices": [{"index": 0, "text": text, "logprobs": lp}], "usage": {"total_tokens": 2}}


def _flaky(fails: list[int]):
    """A transport answering with the given status codes first (0: a connection error), then OK."""
    seen = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= len(fails):
            code = fails[len(seen) - 1]
            if code == 0:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(code, json={"detail": "busy"})
        return httpx.Response(200, json=_echo("x"))

    return httpx.MockTransport(handle), seen


def test_retries_on_429_5xx_and_connection_errors():
    transport, seen = _flaky([429, 503, 0])
    m = RemoteModel("http://127.0.0.1:1", transport=transport, retries=3, backoff=0.001)
    assert m.score(["a"], ["b"]).tolist() == [-1.5]
    assert len(seen) == 4


def test_gives_up_after_the_retries_with_a_message():
    transport, seen = _flaky([500] * 10)
    m = RemoteModel("http://127.0.0.1:1", transport=transport, retries=2, backoff=0.001)
    with pytest.raises(LfmError, match="failed after 3 tries"):
        m.score(["a"], ["b"])
    assert len(seen) == 3


def test_a_server_that_does_not_answer_in_time_is_named_a_timeout_not_a_connection_error():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    m = RemoteModel("http://127.0.0.1:1", transport=httpx.MockTransport(slow), retries=1,
                    backoff=0.001, timeout=7.0)  # fmt: skip
    with pytest.raises(LfmError, match=r"failed after 2 tries \(no answer within 7 s; .*timeout"):
        m.score(["a"], ["b"])
    transport, _ = _flaky([0] * 5)
    m = RemoteModel("http://127.0.0.1:1", transport=transport, retries=1, backoff=0.001)
    with pytest.raises(LfmError, match=r"failed after 2 tries \(connection error\)$"):
        m.score(["a"], ["b"])


def test_client_errors_are_not_retried():
    transport, seen = _flaky([422])
    m = RemoteModel("http://127.0.0.1:1", transport=transport, retries=3, backoff=0.001)
    with pytest.raises(LfmError, match="422: busy"):
        m.score(["a"], ["b"])
    assert len(seen) == 1


def test_the_same_request_is_answered_from_the_cache():
    transport, seen = _flaky([])
    m = RemoteModel("http://127.0.0.1:1", transport=transport)
    first, second = m.score(["a"], ["b"]), m.score(["a"], ["b"])
    assert first.tolist() == second.tolist() and len(seen) == 1 and m.cache_hits == 1
    m.score(["a"], ["c"])
    assert len(seen) == 2


def test_budget_stops_calls_with_a_one_line_error():
    transport, seen = _flaky([])
    budget = Budget(calls=2)
    m = RemoteModel("http://127.0.0.1:1", transport=transport, budget=budget)
    m.score(["a"], ["1"])
    m.score(["a"], ["2"])
    with pytest.raises(BudgetExceeded, match="2 of 2 calls"):
        m.score(["a"], ["3"])
    assert len(seen) == 2 and budget.used_calls == 2
    tokens = Budget(tokens=3)
    m2 = RemoteModel("http://127.0.0.1:1", transport=_flaky([])[0], budget=tokens)
    m2.score(["a"], ["1"])
    m2.score(["a"], ["2"])
    with pytest.raises(BudgetExceeded, match="token budget"):
        m2.score(["a"], ["3"])
