"""A HIDDEN server (`lfm serve --access hidden`): named modules' outputs equal the local handle's,
and kNN-LM, which needs HIDDEN, gives the same distribution through the server as locally."""

from __future__ import annotations

import pytest
import torch

from lfm.access import narrow
from lfm.errors import AccessError, LfmError
from lfm.serve import Backend, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.retrieval import KnnLMConfig, build_datastore, knn_logprobs
from lfm.tuning.tiny import CORPUS
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


@pytest.fixture(scope="module")
def served():
    lm = tiny_lm(0)
    with running(build_app(Backend(lm, "hidden"), ServeSettings(api_key="k"))) as url:
        yield lm, url


def test_remote_hidden_states_equal_the_local_handle(served):
    lm, url = served
    local, remote = narrow(lm, "hidden"), RemoteModel(url, api_key="k", access="hidden")
    texts = ["The team won the match.", "Shares rose.", "A"]
    modules = ["model.norm", "model.layers.0.mlp.down_proj", "model.layers.1"]
    here, there = local.hidden(texts, modules), remote.hidden(texts, modules)
    for i, t in enumerate(texts):
        n = len(lm.tokenizer(t)["input_ids"])
        for m in modules:
            assert there[m].shape[1] == max(len(lm.tokenizer(x)["input_ids"]) for x in texts)
            torch.testing.assert_close(there[m][i, :n], here[m][i, :n], rtol=1e-5, atol=1e-5)
            assert not there[m][i, n:].any()  # padding is zeros, not the pad token's states
    assert remote.info()["lfm_access"] == "hidden"


def test_knn_lm_through_the_server_equals_the_local_run(served):
    lm, url = served
    local, remote = narrow(lm, "hidden"), RemoteModel(url, api_key="k", access="hidden")
    prompt = lm.decode(lm.encode(CORPUS[1])[:6])
    cfg = KnnLMConfig(lam=0.5, k=4)
    want = knn_logprobs(local, [prompt], build_datastore(local, CORPUS[:3]), cfg)
    got = knn_logprobs(remote, [prompt], build_datastore(remote, CORPUS[:3]), cfg)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_modules_and_lower_levels_are_refused(served):
    lm, url = served
    remote = RemoteModel(url, api_key="k", access="hidden")
    with pytest.raises(LfmError, match=r"no module 'model\.nrom' in the served model.*model\.norm"):
        remote.hidden(["The team"], ["model.nrom"])
    with pytest.raises(AccessError, match="HIDDEN"):
        RemoteModel(url, api_key="k", access="embeddings").hidden(["x"], ["model.norm"])
    low_app = build_app(Backend(lm, "embeddings"), ServeSettings(api_key="k"))
    with running(low_app) as low, pytest.raises(LfmError, match="needs HIDDEN access"):
        RemoteModel(low, api_key="k", access="hidden").hidden(["x"], ["model.norm"])


def test_token_rows_give_the_local_states_and_bad_rows_are_refused(served):
    lm, url = served
    local, remote = narrow(lm, "hidden"), RemoteModel(url, api_key="k", access="hidden")
    rows = torch.tensor([lm.encode(CORPUS[0])[:7], lm.encode(CORPUS[1])[:7]])
    modules = ["model.layers.0", "model.norm"]
    here, there = local.hidden(rows, modules), remote.hidden(rows, modules)
    for m in modules:
        assert there[m].shape == (2, 7, here[m].shape[-1])
        torch.testing.assert_close(there[m], here[m], rtol=1e-5, atol=1e-5)
    # rows of unequal length: each one's states are those of the row alone
    short = remote.hidden([rows[0, :3].tolist(), rows[1].tolist()], modules)
    alone = local.hidden(rows[:1, :3], modules)
    torch.testing.assert_close(short["model.norm"][0, :3], alone["model.norm"][0], atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert not short["model.norm"][0, 3:].any()
    vocab = remote.info()["lfm_vocab_size"]
    with pytest.raises(LfmError, match=f"token id {vocab} is outside the vocabulary of {vocab}"):
        remote.hidden([[1, vocab]], modules)
    small = build_app(Backend(lm, "hidden"), ServeSettings(api_key="k", max_items=2))
    with running(small) as u, pytest.raises(LfmError, match="3 token rows exceed the limit of 2"):
        RemoteModel(u, api_key="k", access="hidden", chunk=3).hidden([[1, 2]] * 3, modules)
