"""Tiny models built in code for the smoke runs of the registered tuning methods.

A 2-layer, 32-wide Llama (the architecture of SmolLM2) and a 2-layer BERT encoder, both seeded, so
that `smoke(cfg, seed)` runs end to end in well under a second and without any asset.
"""

from __future__ import annotations

import torch
from torch import nn

from lfm.core.tiny import tiny_config

VOCAB = 64
LABEL_IDS = (10, 11, 12)  # three "label words" of the tiny verbaliser task


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama causal LM with a 64-token vocabulary, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config("llama", VOCAB, max_positions=64)).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 2-layer BERT encoder (the architecture of MiniLM), in eval mode."""
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(tiny_config("bert", VOCAB, max_positions=64), add_pooling_layer=False).eval()


def tiny_batch(seed: int, n: int = 6, length: int = 8) -> dict[str, torch.Tensor]:
    """Random token ids (no padding), a full mask and labels in range(len(LABEL_IDS))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, len(LABEL_IDS), (n,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
