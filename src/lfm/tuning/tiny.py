"""Tiny models built in code for the smoke runs of the registered tuning methods.

A 2-layer, 32-wide Llama (the architecture of SmolLM2) and a 2-layer BERT encoder, both seeded, so
that `smoke(cfg, seed)` runs end to end in well under a second and without any asset.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64
LABEL_IDS = (10, 11, 12)  # three "label words" of the tiny verbaliser task


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama causal LM with a 64-token vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 2-layer BERT encoder (the architecture of MiniLM), in eval mode."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_batch(seed: int, n: int = 6, length: int = 8) -> dict[str, torch.Tensor]:
    """Random token ids (no padding), a full mask and labels in range(len(LABEL_IDS))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, len(LABEL_IDS), (n,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
