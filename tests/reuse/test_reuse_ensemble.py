"""Ensembles over handles: averaging needs SCORES, voting needs TEXT; numbers by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfm.access import Access, LocalClassifier, LocalModel, narrow
from lfm.errors import AccessError
from lfm.reuse.ensemble import (
    EnsembleConfig,
    VoteConfig,
    ensemble_generate,
    ensemble_label_words,
    ensemble_next_token,
    ensemble_predict,
    ensemble_scores,
    vote_labels,
    vote_texts,
)


class _Fixed(nn.Module):
    """Returns the same logits for every input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits).log())

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def _handles(level):
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]
    return [narrow(LocalClassifier(_Fixed(p)), level) for p in probs], torch.zeros(2, 1)


def test_probability_averaging_by_hand_over_narrow_handles():
    hs, x = _handles(Access.SCORES)
    got = ensemble_scores(hs, x).exp()
    torch.testing.assert_close(got[0], torch.tensor([1.3, 1.1, 0.6]) / 3)
    w = ensemble_scores(hs, x, EnsembleConfig(weights=(1.0, 0.0, 1.0))).exp()
    torch.testing.assert_close(w[1], torch.tensor([0.55, 0.2, 0.25]))
    geo = ensemble_scores(hs, x, EnsembleConfig(space="logprob")).exp()[0]
    want = torch.tensor(
        [math.prod(v) ** (1 / 3) for v in ([0.6, 0.2, 0.5], [0.3, 0.7, 0.1], [0.1, 0.1, 0.4])]
    )
    torch.testing.assert_close(geo, want / want.sum())


def test_majority_vote_by_hand_over_label_handles():
    hs, x = _handles(Access.TEXT)  # labels 0, 1, 0
    assert ensemble_predict(hs, x).tolist() == [0, 0]
    assert ensemble_predict(hs, x, VoteConfig(weights=(1.0, 3.0, 1.0))).tolist() == [1, 1]
    assert vote_labels([torch.tensor([2]), torch.tensor([1])]).tolist() == [1]  # tie: smallest


def test_text_handle_is_refused_for_score_averaging_naming_both_levels():
    hs, x = _handles(Access.TEXT)
    with pytest.raises(AccessError, match="needs SCORES access, but the handle gives only TEXT"):
        ensemble_scores(hs, x)


def test_vote_texts_strips_and_weights():
    answers = [[" Paris", "Rome"], ["Paris ", "Madrid"], ["Lyon", "Madrid"]]
    assert vote_texts(answers) == ["Paris", "Madrid"]
    assert vote_texts(answers, [1, 0.1, 0.1]) == ["Paris", "Rome"]


def test_language_model_ensembles(tiny_llama):
    from conftest import make_lm

    m2, tok2 = make_lm("llama", seed=1)
    hs = [LocalModel(*tiny_llama), LocalModel(m2, tok2)]
    scores = [narrow(h, Access.SCORES) for h in hs]
    prompts = ["The capital of Italy is", "Paris is"]
    nt = ensemble_next_token(scores, prompts)
    want = (hs[0].next_token_logprobs(prompts).exp() + hs[1].next_token_logprobs(prompts).exp()) / 2
    torch.testing.assert_close(nt.exp(), want)
    lw = ensemble_label_words(scores, prompts, [" Rome", " France"])
    assert lw.shape == (2, 2) and torch.allclose(lw.exp().sum(-1), torch.ones(2))
    texts = ensemble_generate([narrow(h, Access.TEXT) for h in hs], prompts, max_new_tokens=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(AccessError, match=r"needs SCORES access.*only TEXT"):
        ensemble_label_words([narrow(hs[0], "text")], prompts, [" a"])
