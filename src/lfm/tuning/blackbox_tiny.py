"""A tiny language model with a real (fast) tokenizer, built in code, for the black-box methods.

The smoke runs of BBT, MeZO and discrete prompt search, the served-model load test and the examples
use it: a 2-layer, 32-wide Llama over a byte-level BPE vocabulary (~320 tokens) trained on a few
sentences, wrapped in a `LocalModel`. It needs no asset and builds in well under a second.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lfm.access import LocalModel

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


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS), trainer)
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE fast tokenizer (deterministic: trained once per process, then copied)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_lm(seed: int = 0) -> LocalModel:
    """A seeded 2-layer, 32-wide Llama and its tokenizer as a white-box `LocalModel`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LocalModel(LlamaForCausalLM(cfg).eval(), tok, name=f"tiny-llama-{seed}")


def tiny_task() -> tuple[list[str], torch.Tensor]:
    """Six short texts and their labels in range(3) (sport, business, politics)."""
    return [t for t, _ in TEXTS], torch.tensor([y for _, y in TEXTS])
