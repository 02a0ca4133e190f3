"""Tiny models built in code: the smoke runs of registered methods, the tests and the examples
use them so that nothing needs an asset or a download.

`bpe_tokenizer(corpus)` trains a byte-level BPE fast tokenizer (~320 tokens) on a few sentences;
`tiny_config(kind, vocab)` gives a 2-layer, 32-wide Llama, GPT-2, Gemma 3 or BERT config.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any


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
