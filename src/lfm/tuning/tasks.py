"""Tasks shared by the tuning methods: few-shot splits and prompt-based classification.

Prompt-based classification (as in LM-BFF, Gao et al. 2021, arXiv 2012.15723, and BBT) scores each
class's label word as the continuation of a template and predicts the best:

    ŷ = argmax_c  log p(" " + word_c | template(x))

It needs only SCORES access, so it runs the same on a white-box, narrowed or remote handle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lfm.access import Access, require
from lfm.assets.datasets import TextDataset

BBC_LABEL_WORDS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "technology",
}
BBC_TEMPLATE = "Article: {text}\nTopic:"


@dataclass(frozen=True)
class Verbalizer:
    """A template with one `{text}` slot and one label word per class (scored with a leading space)."""

    template: str
    label_words: tuple[str, ...]
    max_chars: int = 1200  # articles are cut to keep prompts short; the cut is part of the protocol

    def prompt(self, text: str) -> str:
        return self.template.format(text=text[: self.max_chars].strip())


def bbc_verbalizer(classes: Sequence[str]) -> Verbalizer:
    return Verbalizer(BBC_TEMPLATE, tuple(BBC_LABEL_WORDS[c] for c in classes))


def class_scores(handle: object, texts: Sequence[str], verb: Verbalizer) -> torch.Tensor:
    """Log-probabilities (N, C) of each label word after each prompt (SCORES access).

    When every label word is one token, one forward pass per prompt gives all C scores;
    otherwise each (prompt, word) pair is scored on its own.
    """
    require(handle, Access.SCORES, "prompt-based classification")
    prompts = [verb.prompt(t) for t in texts]
    n, c = len(prompts), len(verb.label_words)
    ids = [handle.encode(f" {w}") for w in verb.label_words]  # type: ignore[attr-defined]
    if all(len(i) == 1 for i in ids):
        logp = handle.next_token_logprobs(prompts)  # type: ignore[attr-defined]
        return logp[:, [i[0] for i in ids]]
    flat_p = [p for p in prompts for _ in range(c)]
    flat_w = [f" {w}" for _ in prompts for w in verb.label_words]
    return handle.score(flat_p, flat_w).view(n, c)  # type: ignore[attr-defined]


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())


def few_shot(data: TextDataset, k: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """k training examples per class, drawn with `seed` (the test split is never touched)."""
    g = torch.Generator().manual_seed(seed)
    idx: list[int] = []
    for c in range(len(data.classes)):
        pool = (data.y_train == c).nonzero().flatten()
        if len(pool) < k:
            raise ValueError(
                f"class {data.classes[c]!r} has only {len(pool)} training examples, fewer than k={k}"
            )
        idx += pool[torch.randperm(len(pool), generator=g)[:k]].tolist()
    return [data.train_texts[i] for i in idx], data.y_train[idx]
