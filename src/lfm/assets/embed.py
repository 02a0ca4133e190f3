"""Sentence embeddings for retrieval (REPLUG's documents, IKE's demonstrations).

An `Embedder` maps texts to one vector each, (N, D). `minilm_embedder()` is the paper-faithful
choice (all-MiniLM-L6-v2, an offline asset); `char_embedder` needs no asset (tests, examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Embedder = Callable[[Sequence[str]], torch.Tensor]


def char_embedder(texts: Sequence[str]) -> torch.Tensor:
    """A bag-of-characters embedding (registry examples and tests: no asset)."""
    out = torch.zeros(len(texts), 128)
    for i, t in enumerate(texts):
        for ch in t.lower():
            out[i, ord(ch) % 128] += 1
    return out


def minilm_embedder() -> Embedder:
    """Mean-pooled last hidden states of `minilm-l6` (all-MiniLM-L6-v2), as sentence-transformers
    computes them."""
    from lfm.assets.models import load_model

    enc = load_model("minilm-l6", kind="encoder")

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        batch = enc._batch(list(texts), side="right")  # type: ignore[union-attr]
        h = enc.model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return ((h * m).sum(1) / m.sum(1)).cpu()

    return embed
