"""A tiny language model with a real (fast) tokenizer, built in code, for the black-box methods.

The smoke runs of BBT, MeZO and discrete prompt search, the served-model load test and the examples
use it: a 2-layer, 32-wide Llama over a byte-level BPE vocabulary (~320 tokens) trained on a few
sentences, wrapped in a `LocalModel`. It needs no asset and builds in well under a second.
"""

from __future__ import annotations

import torch

from lfm.access import LocalModel
from lfm.core.tiny import bpe_tokenizer, tiny_config

CORPUS = (
    "Article: The team won the match and the cup.\nTopic: sport",
    "Article: Shares rose as the company reported profit.\nTopic: business",
    "Article: The minister spoke about the election.\nTopic: politics",
    "Article: A new phone and software were released.\nTopic: technology",
    "Article: The film star sang at the festival.\nTopic: entertainment",
)
TEXTS = (
    ("The team won the match.", 0),
    ("The striker scored in the cup final.", 0),
    ("Shares rose after the profit report.", 1),
    ("The company said profit fell.", 1),
    ("The minister called an election.", 2),
    ("Voters backed the party leader.", 2),
)
WORDS = ("sport", "business", "politics")


def tiny_tokenizer():
    """A byte-level BPE fast tokenizer trained on `CORPUS` (deterministic)."""
    return bpe_tokenizer(CORPUS)


def tiny_lm(seed: int = 0) -> LocalModel:
    """A seeded 2-layer, 32-wide Llama and its tokenizer as a white-box `LocalModel`."""
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config("llama", len(tok), max_positions=256))
    return LocalModel(model.eval(), tok, name=f"tiny-llama-{seed}")


def tiny_task() -> tuple[list[str], torch.Tensor]:
    """Six short texts and their labels in range(3) (sport, business, politics)."""
    return [t for t, _ in TEXTS], torch.tensor([y for _, y in TEXTS])
