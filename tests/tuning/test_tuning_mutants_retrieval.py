"""kNN-LM and REPLUG pinned where mutation testing found them loose, on hand-made handles whose
every number is known: each datastore key is the state just before its token (whatever special
positions the model adds in front), the temperature divides the distances, retrieval scores are
cosines of each query and document on their own, the ensemble is per prompt, the progress bar
shows only when asked and leaves no line, and the access errors name the method.
"""

from __future__ import annotations

import math

import pytest
import torch

from lfm.access import Access
from lfm.errors import AccessError
from lfm.tuning.retrieval import (
    Datastore,
    ReplugConfig,
    build_datastore,
    knn_distribution,
    knn_logprobs,
    knn_target_probs,
    replug_logprobs,
    replug_score,
    retrieve,
    token_queries,
)

V = 40  # the fake vocabulary


class Positions:
    """A HIDDEN handle over whitespace tokens: token j of a text has id 10 + j; the model puts
    `prefix` special positions in front, and the state at position r is (r, r, r), its logits
    (r + 1)·v / 100 for token v (a distribution of its own at each position)."""

    access = Access.HIDDEN

    def __init__(self, prefix: int):
        self.prefix = prefix

    def encode(self, text: str) -> list[int]:
        return [10 + j for j in range(len(text.split()))]

    def _n(self, text: str) -> int:
        return self.prefix + len(text.split())

    def hidden(self, texts, modules):
        h = torch.arange(self._n(texts[0]), dtype=torch.float32).unsqueeze(1).repeat(1, 3)
        return {m: h.unsqueeze(0) for m in modules}

    def embed(self, texts):
        n = self._n(texts[0])
        return torch.zeros(1, n, 3), torch.ones(1, n, dtype=torch.long)

    def logits_from_embeds(self, emb, mask):
        n = emb.shape[1]
        return ((torch.arange(n).unsqueeze(1) + 1) * torch.arange(V)).float().unsqueeze(0) / 100


class Level:
    """A handle that declares an access level and offers nothing."""

    def __init__(self, level: Access):
        self.access = level


# ------------------------------------------------------------------------------------------------
# The datastore and the per-token queries.


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_each_datastore_key_is_the_state_just_before_its_token(prefix):
    text = "a b c d e"
    store = build_datastore(Positions(prefix), [text, "f g h"], module="m")
    want_pos, want_ids = [], []
    for t in (text, "f g h"):
        for j in range(len(t.split())):
            if prefix + j - 1 >= 0:  # a token with a position before it
                want_pos.append(prefix + j - 1)
                want_ids.append(10 + j)
    assert store.values.tolist() == want_ids
    assert store.keys[:, 0].tolist() == want_pos and store.keys.shape == (len(want_ids), 3)
    assert store.module == "m"


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_token_queries_give_each_token_its_preceding_state_and_lm_logprob(prefix):
    text = "a b c d e"
    q, lm, ids = token_queries(Positions(prefix), text, "m")
    first = 1 if prefix == 0 else 0  # the first token is predicted when something precedes it
    js = list(range(first, 5))
    pos = [prefix + j - 1 for j in js]
    logits = Positions(prefix).logits_from_embeds(torch.zeros(1, prefix + 5, 3), None)[0]
    logp = logits.log_softmax(-1)
    assert ids.tolist() == [10 + j for j in js]
    assert q[:, 0].tolist() == pos
    torch.testing.assert_close(
        lm, torch.stack([logp[r, 10 + j] for r, j in zip(pos, js, strict=True)])
    )


def test_the_progress_bar_shows_only_with_a_description_and_leaves_no_line(capsys):
    build_datastore(Positions(1), ["a b", "c d"], module="m")
    assert capsys.readouterr().err == ""
    build_datastore(Positions(1), ["a b", "c d"], module="m", desc="datastore")
    err = capsys.readouterr().err
    assert "datastore" in err
    assert err.rstrip("\r").split("\r")[-1].strip() == ""  # the finished bar is erased


# ------------------------------------------------------------------------------------------------
# The kNN distribution's temperature.

STORE = Datastore(torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([4, 4, 2]), "m")


def test_the_knn_temperature_divides_the_squared_distances():
    w = torch.softmax(-torch.tensor([0.0, 1.0, 9.0]) / 2.0, 0)  # T = 2
    p = knn_distribution(torch.tensor([0.0]), STORE, vocab=6, k=3, temperature=2.0)
    torch.testing.assert_close(p, torch.tensor([0, 0, w[2], 0, w[0] + w[1], 0]))
    got = knn_target_probs(torch.tensor([[0.0], [0.0]]), torch.tensor([4, 2]), STORE, 3, 2.0)
    torch.testing.assert_close(got, torch.stack([w[0] + w[1], w[2]]))


# ------------------------------------------------------------------------------------------------
# REPLUG: retrieval and the ensemble.

DOCS = ["doc zero", "doc one", "doc two"]
EMB = {"doc zero": [3.0, 0.0], "doc one": [0.0, 0.5], "doc two": [2.0, 2.0],
       "p": [10.0, 1.0], "q": [0.1, 0.3]}  # fmt: skip
LOGP = {"doc zero": [0.7, 0.2, 0.1], "doc one": [0.1, 0.1, 0.8], "doc two": [0.3, 0.4, 0.3]}
SCORE = {"doc zero": -1.0, "doc one": -3.0, "doc two": -0.5}  # log p(continuation | doc ∘ x)


def embed(texts):
    return torch.tensor([EMB[t] for t in texts])


class DocScores:
    """A SCORES handle whose answers depend only on the document in front of the input."""

    access = Access.SCORES

    def next_token_logprobs(self, prompts):
        return torch.tensor([LOGP[p.split("\n\n")[0]] for p in prompts]).log()

    def score(self, prompts, continuations):
        return torch.tensor([SCORE[p.split("\n\n")[0]] + len(c) for p, c in
                             zip(prompts, continuations, strict=True)])  # fmt: skip


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def _weights(x, k, tau, doc_emb=EMB):
    sims = sorted(((_cos(EMB[x], doc_emb[d]), d) for d in DOCS), reverse=True)[:k]
    w = torch.softmax(torch.tensor([s for s, _ in sims]) / tau, 0)
    return [d for _, d in sims], w


def test_retrieval_scores_are_the_cosines_of_each_query_and_document():
    scores, idx = retrieve(embed(["p", "q"]), embed(DOCS), k=3)
    for b, x in enumerate(["p", "q"]):
        want = sorted(((_cos(EMB[x], EMB[d]), j) for j, d in enumerate(DOCS)), reverse=True)
        assert idx[b].tolist() == [j for _, j in want]
        torch.testing.assert_close(scores[b], torch.tensor([s for s, _ in want]))


def test_asking_for_more_documents_than_there_are_retrieves_them_all():
    scores, idx = retrieve(embed(["p"]), embed(DOCS), k=10)
    assert scores.shape == idx.shape == (1, 3) and sorted(idx[0].tolist()) == [0, 1, 2]


def test_replug_mixes_each_prompts_documents_by_their_tempered_retrieval_weights():
    cfg = ReplugConfig(k=2, temperature=0.5, doc_chars=100)
    out = replug_logprobs(DocScores(), ["p", "q"], DOCS, embed, cfg)
    assert out.shape == (2, 3)
    for b, x in enumerate(["p", "q"]):
        docs, w = _weights(x, 2, 0.5)
        want = sum(wi * torch.tensor(LOGP[d]) for wi, d in zip(w, docs, strict=True))
        torch.testing.assert_close(out[b].exp(), want)


def test_replug_scores_each_prefix_with_its_own_documents():
    cfg = ReplugConfig(k=2, temperature=0.5, doc_chars=100)
    out = replug_score(DocScores(), ["p", "q"], ["ab", "abcd"], DOCS, embed, cfg)
    assert out.shape == (2,)
    for b, (x, y) in enumerate([("p", "ab"), ("q", "abcd")]):
        docs, w = _weights(x, 2, 0.5)
        want = math.log(
            sum(float(wi) * math.exp(SCORE[d] + len(y)) for wi, d in zip(w, docs, strict=True))
        )
        assert float(out[b]) == pytest.approx(want, abs=1e-5)


def test_replug_retrieves_by_the_document_embeddings_it_is_given():
    # documents embedded by an encoder of their own (asymmetric retrieval); `embed` is the
    # query encoder and must not re-embed them
    own = {"doc zero": [0.0, 1.0], "doc one": [1.0, 0.0], "doc two": [1.0, 3.0]}
    doc_embs = torch.tensor([own[d] for d in DOCS])

    def queries_only(texts):
        assert not set(texts) & set(DOCS), "the documents were embedded again"
        return embed(texts)

    cfg = ReplugConfig(k=2, temperature=0.5, doc_chars=100)
    out = replug_logprobs(DocScores(), ["p", "q"], DOCS, queries_only, cfg, doc_embs)
    score = replug_score(DocScores(), ["p", "q"], ["ab", "ab"], DOCS, queries_only, cfg, doc_embs)
    for b, x in enumerate(["p", "q"]):
        docs, w = _weights(x, 2, 0.5, own)
        want = sum(wi * torch.tensor(LOGP[d]) for wi, d in zip(w, docs, strict=True))
        torch.testing.assert_close(out[b].exp(), want)
        mix = sum(float(wi) * math.exp(SCORE[d] + 2) for wi, d in zip(w, docs, strict=True))
        assert float(score[b]) == pytest.approx(math.log(mix), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Access errors name the method.


def test_knn_lm_refuses_a_handle_without_hidden_states_by_name():
    scores = Level(Access.SCORES)
    for call in (lambda: build_datastore(scores, ["a"]),
                 lambda: knn_logprobs(scores, ["a"], STORE),
                 lambda: token_queries(scores, "a", "m")):  # fmt: skip
        with pytest.raises(AccessError, match="tuning/knn_lm needs HIDDEN access"):
            call()


def test_replug_refuses_a_handle_without_scores_by_name():
    text = Level(Access.TEXT)
    with pytest.raises(AccessError, match="tuning/replug needs SCORES access"):
        replug_logprobs(text, ["p"], DOCS, embed)
    with pytest.raises(AccessError, match="tuning/replug needs SCORES access"):
        replug_score(text, ["p"], ["y"], DOCS, embed)
