"""A client against a live server on loopback: same numbers as the local handle, batching batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lfm.access import Access, narrow
from lfm.errors import AccessError
from lfm.serve import Backend, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


@pytest.fixture(scope="module")
def served():
    lm = tiny_lm(0)
    app = build_app(
        Backend(lm, "embeddings"), ServeSettings(api_key="k", max_wait_ms=30, max_batch=64)
    )
    with running(app) as url:
        yield lm, app, url


def test_remote_scores_equal_the_local_handle(served):
    lm, _, url = served
    local = narrow(lm, "embeddings")
    remote = RemoteModel(url, api_key="k", access="embeddings")
    prompts = ["Article: The team won.\nTopic:", "Article: Shares rose.\nTopic:", ""]
    conts = [" sport", " business", "The minister"]
    assert torch.allclose(remote.score(prompts, conts), local.score(prompts, conts), atol=1e-4)
    assert torch.allclose(
        remote.next_token_logprobs(prompts[:2]), local.next_token_logprobs(prompts[:2]), atol=1e-4
    )
    assert remote.encode(" sport") == local.encode(" sport")
    assert remote.vocab_size == local.vocab_size and remote.info()["lfm_access"] == "embeddings"
    assert remote.generate(["The team"], max_new_tokens=3) == local.generate(
        ["The team"], max_new_tokens=3
    )


def test_remote_embeddings_equal_the_local_handle(served):
    lm, _, url = served
    local, remote = narrow(lm, "embeddings"), RemoteModel(url, api_key="k", access="embeddings")
    texts = ["The team won the match.", "Shares rose."]
    (el, ml), (er, mr) = local.embed(texts), remote.embed(texts)
    assert torch.equal(ml, mr) and torch.equal(el[ml.bool()], er[mr.bool()])
    ll, lr = local.logits_from_embeds(el, ml), remote.logits_from_embeds(er, mr)
    assert torch.allclose(ll[ml.bool()], lr[mr.bool()], atol=1e-4)
    last = ml.sum(1) - 1
    rows = remote.logits_from_embeds(er, mr, positions=last)
    assert rows.shape == (2, lm.vocab_size) and torch.allclose(
        rows, ll[torch.arange(2), last], atol=1e-4
    )


def test_concurrent_requests_share_forward_passes(served):
    _, app, url = served
    stats = app.state.batcher.stats
    before_passes, before_requests = stats.passes, stats.requests
    clients = [RemoteModel(url, api_key="k") for _ in range(12)]
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda c: c.score([f"Article {id(c)}"], [" sport"]), clients))
    passes, requests = stats.passes - before_passes, stats.requests - before_requests
    assert requests == 12 and passes < requests


def test_remote_handle_refuses_above_its_level(served):
    _, _, url = served
    remote = RemoteModel(url, api_key="k", access="scores")
    with pytest.raises(AccessError, match="needs EMBEDDINGS"):
        remote.embed(["x"])
    assert remote.access is Access.SCORES and not hasattr(remote, "model")
