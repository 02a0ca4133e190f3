"""Tiny models built in code, so unit tests need no downloaded or packaged assets.

Real-asset tests are marked `slow`; they run in CI too (CI installs the assets).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lfm.core.tiny import bpe_tokenizer, tiny_config

# Tiny models gain nothing from intra-op threads, and threads fight on a busy machine.
torch.set_num_threads(int(os.environ.get("LFM_TEST_THREADS", "1")))

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "A small model learns from a large model through its interface.",
    "Tokyo is a large city in Japan; Kyoto is an old city.",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (vocab ~320), as a fast tokenizer."""
    return bpe_tokenizer(CORPUS)


def make_lm(kind: str = "llama", seed: int = 0):
    """A 2-layer, 32-wide causal LM of the given architecture and its tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tok)), dtype=torch.float32)
    return model.eval(), tok


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, n_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2 and a linear head, for 1x28x28 (or 1x8x8) images."""

    def __init__(self, n_out: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def tiny_lm(request):
    """(model, tokenizer) for each supported architecture."""
    return make_lm(request.param)


@pytest.fixture
def tiny_llama():
    return make_lm("llama")


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()
