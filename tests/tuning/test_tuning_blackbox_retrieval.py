"""kNN-LM and REPLUG on a tiny model: the interpolation and the ensemble against hand computations,
and the retrieval-augmented handles the tuners return."""

from __future__ import annotations

import pytest
import torch

from lfm.access import narrow
from lfm.errors import AccessError
from lfm.tuning.retrieval import (
    KnnLMConfig,
    ReplugConfig,
    build_datastore,
    char_embedder,
    knn_distribution,
    replug_logprobs,
)
from lfm.tuning.retrieval import knn_logprobs as knn_lm
from lfm.tuning.tiny import CORPUS
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(0)


def test_knn_lm_interpolates_between_the_lm_and_the_datastore(lm):
    h = narrow(lm, "hidden")
    text = CORPUS[0]
    store = build_datastore(h, [text])
    assert len(store.values) == len(lm.encode(text)) and store.keys.shape[1] == 32
    prefix_ids = lm.encode(text)[:5]
    prompt = lm.decode(prefix_ids)
    pure_lm = knn_lm(h, [prompt], store, KnnLMConfig(lam=0.0))
    assert torch.allclose(pure_lm, h.next_token_logprobs([prompt]), atol=1e-5)
    # λ = 1, k = 1: the nearest key is the prompt's own last state; its stored next token wins
    memo = knn_lm(h, [prompt], store, KnnLMConfig(lam=1.0, k=1))
    assert int(memo.argmax()) == lm.encode(text)[5] and float(memo.max()) == pytest.approx(
        0.0, abs=1e-5
    )


def test_knn_distribution_sums_weights_per_token():
    from lfm.tuning.retrieval import Datastore

    store = Datastore(torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([4, 4, 2]), "m")
    p = knn_distribution(torch.tensor([0.0]), store, vocab=6, k=3, temperature=1.0)
    w = torch.softmax(-torch.tensor([0.0, 1.0, 9.0]), 0)
    assert torch.allclose(p, torch.tensor([0, 0, w[2], 0, w[0] + w[1], 0]))


def test_replug_with_one_document_is_the_lm_on_that_document(lm):
    s = narrow(lm, "scores")
    out = replug_logprobs(s, ["The team won the"], CORPUS, char_embedder, ReplugConfig(k=1))
    sims = torch.nn.functional.cosine_similarity(
        char_embedder(["The team won the"]), char_embedder(CORPUS)
    )
    best = CORPUS[int(sims.argmax())]
    assert torch.allclose(out, s.next_token_logprobs([best + "\n\nThe team won the"]), atol=1e-5)
    two = replug_logprobs(s, ["The team won the"], CORPUS, char_embedder, ReplugConfig(k=2))
    assert torch.allclose(two.exp().sum(-1), torch.ones(1), atol=1e-4)


def test_retrieval_methods_refuse_lower_levels(lm):
    with pytest.raises(AccessError, match="needs HIDDEN access"):
        build_datastore(narrow(lm, "embeddings"), ["x"])
    with pytest.raises(AccessError, match="needs SCORES access"):
        replug_logprobs(narrow(lm, "text"), ["x"], ["y"], char_embedder)


def test_token_queries_give_the_knn_lm_of_each_position(lm):
    from lfm.tuning.retrieval import interpolate, knn_target_probs, token_queries

    h = narrow(lm, "hidden")
    store = build_datastore(h, CORPUS[1:3])
    text = CORPUS[0]
    q, lm_logp, ids = token_queries(h, text, store.module)
    toks = lm.encode(text)
    off = len(toks) - len(ids)  # 0 when the tokenizer adds BOS (the first token is predicted too)
    assert off in (0, 1) and torch.equal(ids, torch.tensor(toks[off:]))
    p = knn_target_probs(q, ids, store, k=4, temperature=1.0, chunk=3)  # chunks of 3 queries
    cfg = KnnLMConfig(k=4, lam=0.25)
    for j in (2, 6):  # entry j predicts ids[j]: the same as knn_lm on the prefix before it
        prompt = lm.decode(toks[: j + off])
        full = knn_lm(h, [prompt], store, cfg)[0]
        assert float(interpolate(lm_logp, p, 0.25)[j]) == pytest.approx(
            float(full[ids[j]]), abs=1e-4
        )
        nxt = h.next_token_logprobs([prompt])[0, ids[j]]
        assert float(lm_logp[j]) == pytest.approx(float(nxt), abs=1e-4)
        assert float(p[j]) == pytest.approx(
            float(knn_distribution(q[j], store, lm.vocab_size, 4, 1.0)[ids[j]]), abs=1e-6
        )


def test_replug_score_mixes_sequence_probabilities_by_retrieval_weight(lm):
    from lfm.tuning.retrieval import replug_score, retrieve

    s = narrow(lm, "scores")
    x, y, cfg = ["The team won the"], [" match today"], ReplugConfig(k=2, temperature=0.5)
    out = replug_score(s, x, y, CORPUS, char_embedder, cfg)
    sims, idx = retrieve(char_embedder(x), char_embedder(CORPUS), 2)
    w = torch.softmax(sims[0] / 0.5, 0)
    per_doc = s.score([CORPUS[j] + "\n\n" + x[0] for j in idx[0].tolist()], y * 2)
    assert float(out[0]) == pytest.approx(float(torch.log((w * per_doc.exp()).sum())), abs=1e-5)
    one = replug_score(s, x, y, CORPUS, char_embedder, ReplugConfig(k=1))
    assert float(one[0]) == pytest.approx(float(per_doc[0]), abs=1e-5)


def test_knn_lm_tuner_returns_a_scores_handle_that_interpolates(lm, tmp_path):
    from lfm.access import Access, access_of
    from lfm.registry import run
    from lfm.tuning.augmented import KnnLMHandle, load_datastore
    from lfm.tuning.retrieval import interpolate, knn_target_probs, token_queries
    from lfm.tuning.tasks import Corpus

    h = narrow(lm, "hidden")
    cfg = KnnLMConfig(k=4, lam=0.25)
    res = run("tuning/knn_lm", h, Corpus(CORPUS[1:3]), cfg=cfg)
    aug = res.handle
    assert access_of(aug) is Access.SCORES and res.metrics["entries"] == len(
        res.handle.store.values
    )
    prompt = "Article: The team won"
    torch.testing.assert_close(
        aug.next_token_logprobs([prompt]), knn_lm(h, [prompt], aug.store, cfg)
    )
    x, y = "Article: The team", " won the match"
    q, lm_logp, ids = token_queries(h, x + y, aug.store.module)
    n = len(lm.encode(x + y)) - len(lm.encode(x))
    want = interpolate(
        lm_logp[-n:], knn_target_probs(q[-n:], ids[-n:], aug.store, 4, 1.0), 0.25
    ).sum()
    assert float(aug.score([x], [y])[0]) == pytest.approx(float(want), abs=1e-5)
    assert len(aug.generate([prompt], max_new_tokens=2)) == 1
    res.save(tmp_path / "knn")
    store = load_datastore(tmp_path / "knn")
    again = KnnLMHandle(h, store, cfg)
    torch.testing.assert_close(
        again.next_token_logprobs([prompt]), aug.next_token_logprobs([prompt])
    )


def test_replug_tuner_returns_a_scores_handle_over_its_documents(lm, tmp_path):
    from lfm.registry import run
    from lfm.tuning.augmented import ReplugHandle, load_documents
    from lfm.tuning.retrieval import replug_score
    from lfm.tuning.tasks import Documents

    s = narrow(lm, "scores")
    cfg = ReplugConfig(k=2)
    res = run("tuning/replug", s, Documents(CORPUS), cfg=cfg, embed=char_embedder)
    x = ["The team won the"]
    want = replug_logprobs(s, x, CORPUS, char_embedder, cfg)
    torch.testing.assert_close(res.handle.next_token_logprobs(x), want)
    torch.testing.assert_close(
        res.handle.score(x, [" match"]), replug_score(s, x, [" match"], CORPUS, char_embedder, cfg)
    )
    res.save(tmp_path / "replug")
    docs = load_documents(tmp_path / "replug")
    assert docs.texts == CORPUS and torch.equal(docs.embeddings, char_embedder(CORPUS))
    again = ReplugHandle(s, docs, char_embedder, cfg)
    torch.testing.assert_close(again.next_token_logprobs(x), want)
    with pytest.raises(AccessError, match="tuning/replug needs SCORES access"):
        run("tuning/replug", narrow(lm, "text"), Documents(CORPUS), embed=char_embedder)
