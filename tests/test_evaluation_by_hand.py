"""The evaluation every reported figure rests on, against values worked out by hand: perplexity,
the distillation and fusion accuracies, and meta-test's mean with its 95 % interval."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfm.distill.lm import perplexity
from lfm.distill.vision import accuracy as vision_accuracy
from lfm.meta.tasks import classification, regression
from lfm.meta.train import summarise
from lfm.reuse.fusion import accuracy as fusion_accuracy


class NextIsSuccessor(nn.Module):
    """A 4-token LM that gives the successor (id + 1 mod 4) of every token probability 1/2 and
    each other token 1/6."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # a device to read

    def forward(self, input_ids):
        succ = (input_ids + 1) % 4
        logp = torch.full((*input_ids.shape, 4), math.log(1 / 6))
        logp.scatter_(-1, succ[..., None], math.log(1 / 2))

        class Out:
            logits = logp + self.dummy

        return Out()


def test_perplexity_by_hand():
    blocks = torch.tensor([[0, 1, 2, 0], [3, 0, 0, 0], [1, 1, 2, 2]])
    # next-token pairs: 0→1 hit, 1→2 hit, 2→0 miss | 3→0 hit, 0→0 miss, 0→0 miss |
    # 1→1 miss, 1→2 hit, 2→2 miss: 4 hits at −log(1/2), 5 misses at −log(1/6), over 9
    want = math.exp((4 * math.log(2) + 5 * math.log(6)) / 9)
    for batch in (1, 2, 3):  # blocks split over batches weigh by their tokens, not per batch
        assert perplexity(NextIsSuccessor(), blocks, batch_size=batch) == pytest.approx(want)


def test_image_accuracies_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [5.0, -1.0], [0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0, 1])
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate (ties: class 0)
    # predictions 0, 1, 1, 0, 0 against 0, 1, 0, 0, 1: three right of five
    assert vision_accuracy(model, x, y, batch=2) == pytest.approx(0.6)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps the two classes
    sd = {"weight": 2 * torch.eye(2)}  # the backbone's weights as the merge gives them
    # features 2x, classes swapped: 1, 0, 0, 1 and, for the tie at (0, 0), class 0; against
    # 0, 1, 0, 0, 1 one right of five
    assert fusion_accuracy(model, sd, head, (x, y), batch=3) == pytest.approx(0.2)


def test_meta_test_scores_and_interval_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(classification(3).metric(logits, torch.tensor([0, 1, 1, 2]))) == 0.5
    pred, y = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[0.0], [2.0], [1.0]])
    assert float(regression().metric(pred, y)) == pytest.approx((1 + 0 + 9) / 3)
    # mean 2.5; sample std √(((1.5)² + (0.5)² + (0.5)² + (1.5)²) / 3) = √(5/3); n = 4
    got = summarise(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert got["mean"] == 2.5 and got["n"] == 4
    assert got["ci95"] == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert summarise(torch.tensor([0.7])) == {"mean": pytest.approx(0.7), "ci95": 0.0, "n": 1}
