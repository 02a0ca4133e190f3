"""Tiny models built in code: the registry's examples, the tests, the benchmarks' smoke modes and
the examples use them, so that nothing needs an asset or a download. This is the one builder.

- `tiny_lm(kind, seed)`: a 2-layer, 32-wide Llama, GPT-2 or Gemma 3 causal LM (or a BERT encoder)
  and a byte-level BPE fast tokenizer trained on `CORPUS` (~320 tokens);
- `TinyMLP`, `TinyCNN`: small classifiers for vectors and 1×28×28 (or 1×8×8) images;
- `bpe_tokenizer(corpus)` and `tiny_config(kind, vocab)`, the pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import nn


@lru_cache(maxsize=8)
def _bpe_json(corpus: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    tok.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 0)]
    )
    return str(tok.to_str())


def bpe_tokenizer(corpus: Sequence[str], vocab_size: int = 320) -> Any:
    """A byte-level BPE fast tokenizer trained on `corpus` (ids: <bos>=0, <eos>=1, <pad>=2).

    Training is deterministic and cached per corpus; each call returns a fresh tokenizer object.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_bpe_json(tuple(corpus), vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_config(kind: str, vocab: int, max_positions: int = 128) -> Any:
    """A 2-layer, 32-wide config of architecture `kind` (llama, gpt2, gemma3 or bert)."""
    from transformers import BertConfig, Gemma3TextConfig, GPT2Config, LlamaConfig

    special: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            tie_word_embeddings=True, **special,
        )  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions, **special
        )
    if kind == "gemma3":
        return Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=max_positions, sliding_window=16, **special,
        )  # fmt: skip
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_positions,
        )  # fmt: skip
    raise ValueError(f"no tiny config for {kind!r}; choose llama, gpt2, gemma3 or bert")


# Sentences the tiny tokenizer is trained on: facts for editing, news-like lines for classifying.
CORPUS = (
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "A small model learns from a large model through its interface.",
    "Tokyo is a large city in Japan; Kyoto is an old city.",
)


def tiny_lm(
    kind: str = "llama",
    seed: int = 0,
    corpus: Sequence[str] = CORPUS,
    vocab_size: int = 320,
    max_positions: int = 128,
) -> tuple[Any, Any]:
    """A seeded 2-layer, 32-wide model of architecture `kind` in eval mode, and its tokenizer.

    Args:
        kind: llama, gpt2 or gemma3 (causal LMs), or bert (an encoder without pooling layer).
        seed: seeds the weights (the tokenizer is deterministic).
        corpus: sentences the byte-level BPE tokenizer is trained on.
        vocab_size: the tokenizer's vocabulary at most (the model's is the tokenizer's length).
        max_positions: the model's context length.
    """
    from transformers import AutoModelForCausalLM, BertModel

    tok = bpe_tokenizer(corpus, vocab_size)
    config = tiny_config(kind, len(tok), max_positions)
    torch.manual_seed(seed)
    if kind == "bert":
        return BertModel(config, add_pooling_layer=False).eval(), tok
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tok


class TinyMLP(nn.Module):
    """Two linear layers with a ReLU between: `fc1`, `fc2`."""

    def __init__(self, d_in: int = 8, hidden: int = 16, n_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyCNN(nn.Module):
    """Conv-BN-ReLU ×2 and a linear head over the spatial mean, for 1×H×W images."""

    def __init__(self, n_out: int = 10, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))  # (B, n_out)


def tiny_mlp(seed: int = 0, **kw: int) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kw)


def tiny_cnn(seed: int = 0, warm: bool = True, **kw: int) -> TinyCNN:
    """A seeded `TinyCNN`; `warm` runs a few random batches so BatchNorm has running statistics."""
    torch.manual_seed(seed)
    model = TinyCNN(**kw)
    if warm:
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(16, 1, 8, 8))
    return model.eval()
