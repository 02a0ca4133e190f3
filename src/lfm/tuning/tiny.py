"""A tiny news-topic task for the tuning methods' registry examples and the tests.

The model is the one tiny builder's (`lfm.core.tiny.tiny_lm`): a 2-layer, 32-wide Llama whose
byte-level BPE tokenizer (~320 tokens) is trained on `CORPUS`, a few templated news lines, so
that the label words and the template are real tokens. It needs no asset and builds in well under
a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lfm.access import Access, LocalModel, narrow
from lfm.config import Config
from lfm.core.tiny import bpe_tokenizer, tiny_lm
from lfm.core.train import TrainConfig
from lfm.registry import Example
from lfm.tuning.tasks import TextClassification, Verbalizer

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
# one label word per class whose first token (with its leading space) is its own in this vocabulary
WORDS = ("sport", "profit", "minister")
TEMPLATE = "Article: {text}\nTopic:"


def news_tokenizer() -> Any:
    """The byte-level BPE fast tokenizer of `CORPUS` (deterministic)."""
    return bpe_tokenizer(CORPUS)


def tiny_news_lm(seed: int = 0) -> LocalModel:
    """A seeded 2-layer, 32-wide Llama over the `CORPUS` tokenizer, as a white-box `LocalModel`."""
    model, tok = tiny_lm("llama", seed, corpus=CORPUS, max_positions=256)
    return LocalModel(model, tok, name=f"tiny-llama-{seed}")


def tiny_task() -> TextClassification:
    """Six short texts, their labels in range(3) (sport, business, politics) and the verbaliser."""
    texts, labels = zip(*TEXTS, strict=True)
    return TextClassification(texts, torch.tensor(labels), Verbalizer(TEMPLATE, WORDS))


def example(
    cfg: Config | None = None,
    data: Callable[[], Any] = tiny_task,
    summary: Callable[[Any], Any] | None = None,
    steps: int | None = 2,
    lr: float = 1e-2,
    seed: bool = True,
    **kwargs: Any,
) -> Callable[[Access, int], Example]:
    """The registry example of a tuner: the tiny LM at `level`, `data()`, a small `cfg`.

    Args:
        steps: training steps of a gradient tuner (`train_cfg`); None for a tuner without one.
        lr: its learning rate.
        seed: pass the example's seed to the tuner (`seed=`).
        summary: maps the result to what two runs of one seed must share (default: the tuned
            classifier's class logits on the task).
        kwargs: more keyword arguments of the call (an embedder ...).
    """

    takes_seed = seed

    def build(level: Access, seed: int) -> Example:
        task = data()
        extra: dict[str, Any] = dict(kwargs, seed=seed) if takes_seed else dict(kwargs)
        if steps is not None:
            extra["train_cfg"] = TrainConfig(
                steps=steps, lr=lr, seed=seed, progress=False, cpu=True
            )
        show = summary or (lambda r: r.scores(list(task.texts)))
        return Example((narrow(tiny_news_lm(seed), level), task), extra, cfg, show)

    return build
