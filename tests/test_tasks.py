"""Prompt-based classification shared by the tuning methods."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalModel, narrow
from lfm.assets.datasets import TextDataset
from lfm.errors import AccessError
from lfm.tuning.tasks import Verbalizer, accuracy, class_scores, few_shot

from conftest import make_lm


def test_single_token_fast_path_equals_pairwise_scoring():
    h = LocalModel(*make_lm("llama"))
    words = ("city", "the")  # single tokens in the tiny tokenizer's vocabulary
    assert all(len(h.encode(f" {w}")) == 1 for w in words)
    verb = Verbalizer("City: {text} ->", words)
    texts = ["The capital of Italy", "Tokyo is a large city in Japan"]
    fast = class_scores(narrow(h, "scores"), texts, verb)
    slow = torch.stack([h.score([verb.prompt(t)] * 2, [" city", " the"]) for t in texts])
    assert torch.allclose(fast, slow, atol=1e-4)
    multi = Verbalizer("City: {text} ->", ("city", "Kyoto is old"))
    out = class_scores(h, texts, multi)
    assert torch.allclose(
        out[:, 1], h.score([multi.prompt(t) for t in texts], [" Kyoto is old"] * 2), atol=1e-4
    )
    assert accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([1, 1])) == 0.5


def test_text_handle_is_refused():
    h = narrow(LocalModel(*make_lm("llama")), "text")
    with pytest.raises(AccessError, match="needs SCORES access, but the handle gives only TEXT"):
        class_scores(h, ["x"], Verbalizer("{text}", ("a",)))


def test_few_shot_is_seeded_and_per_class():
    data = TextDataset(
        "t",
        tuple(f"t{i}" for i in range(30)),
        torch.arange(30) % 3,
        (),
        torch.zeros(0),
        ("a", "b", "c"),
    )
    texts, y = few_shot(data, 4, seed=1)
    assert y.bincount().tolist() == [4, 4, 4] and len(set(texts)) == 12
    assert few_shot(data, 4, seed=1)[0] == texts and few_shot(data, 4, seed=2)[0] != texts
    with pytest.raises(ValueError, match="fewer than k=11"):
        few_shot(data, 11, seed=0)
