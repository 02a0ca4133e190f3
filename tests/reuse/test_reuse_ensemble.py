"""Ensembles over handles: averaging needs SCORES, voting needs TEXT; numbers by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfm import registry
from lfm.access import Access, LocalClassifier, LocalModel, narrow
from lfm.errors import AccessError, ConfigError, LfmError
from lfm.reuse.ensemble import (
    EnsembleConfig,
    LabelWords,
    VoteConfig,
    ensemble_average,
    ensemble_vote,
    label_word_logprobs,
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
    got = ensemble_average(hs, x).exp()
    torch.testing.assert_close(got[0], torch.tensor([1.3, 1.1, 0.6]) / 3)
    w = ensemble_average(hs, x, EnsembleConfig(weights=(1.0, 0.0, 1.0))).exp()
    torch.testing.assert_close(w[1], torch.tensor([0.55, 0.2, 0.25]))
    geo = ensemble_average(hs, x, EnsembleConfig(space="logprob")).exp()[0]
    want = torch.tensor(
        [math.prod(v) ** (1 / 3) for v in ([0.6, 0.2, 0.5], [0.3, 0.7, 0.1], [0.1, 0.1, 0.4])]
    )
    torch.testing.assert_close(geo, want / want.sum())


def test_majority_vote_by_hand_over_label_handles():
    hs, x = _handles(Access.TEXT)  # labels 0, 1, 0
    assert ensemble_vote(hs, x).tolist() == [0, 0]
    assert ensemble_vote(hs, x, VoteConfig(weights=(1.0, 3.0, 1.0))).tolist() == [1, 1]
    assert vote_labels([torch.tensor([2]), torch.tensor([1])]).tolist() == [1]  # tie: smallest


def test_text_handle_is_refused_for_score_averaging_naming_both_levels():
    hs, x = _handles(Access.TEXT)
    with pytest.raises(AccessError, match="needs SCORES access, but the handle gives only TEXT"):
        ensemble_average(hs, x)
    with pytest.raises(AccessError, match=r"reuse/ensemble_average needs SCORES.*only TEXT"):
        registry.run("reuse", "ensemble_average", hs, x)


def test_methods_by_name_take_a_subclassed_config_and_refuse_another_methods():
    hs, x = _handles(Access.SCORES)

    class MyVote(VoteConfig):  # a user's subclass is still the vote's config
        pass

    got = registry.run("reuse/ensemble_vote", hs, x, cfg=MyVote(weights=(1.0, 3.0, 1.0)))
    assert got.tolist() == [1, 1]
    assert registry.run("reuse/ensemble_average", hs, x, cfg={"space": "logprob"}).shape == (2, 3)
    with pytest.raises(ConfigError, match="takes a EnsembleConfig, not a VoteConfig"):
        ensemble_average(hs, x, VoteConfig())
    with pytest.raises(LfmError, match="2 weights for 3 ensemble members"):
        ensemble_average(hs, x, EnsembleConfig(weights=(1.0, 2.0)))


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
    nt = ensemble_average(scores, prompts)  # LMs: next-token distributions
    want = (hs[0].next_token_logprobs(prompts).exp() + hs[1].next_token_logprobs(prompts).exp()) / 2
    torch.testing.assert_close(nt.exp(), want)
    words = [" Rome", " France"]
    lw = ensemble_average([LabelWords(h, words) for h in scores], prompts)
    assert lw.shape == (2, 2) and torch.allclose(lw.exp().sum(-1), torch.ones(2))
    each = [label_word_logprobs(h, prompts, words).exp() for h in hs]
    torch.testing.assert_close(lw.exp(), (each[0] + each[1]) / 2)
    texts = ensemble_vote([narrow(h, Access.TEXT) for h in hs], prompts, {"max_new_tokens": 2})
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    alone = hs[0].generate(prompts, max_new_tokens=2)
    assert ensemble_vote([narrow(hs[0], Access.TEXT)], prompts, {"max_new_tokens": 2}) == [
        a.strip() for a in alone
    ]
    with pytest.raises(AccessError, match=r"needs SCORES access.*only TEXT"):
        LabelWords(narrow(hs[0], "text"), [" a"])
    with pytest.raises(LfmError, match="mix classifiers and language models"):
        ensemble_average([scores[0], LocalClassifier(_Fixed([0.5, 0.5]))], prompts)
