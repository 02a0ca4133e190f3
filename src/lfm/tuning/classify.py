"""Classification models for tuning: label words of a causal LM, or a head on an encoder.

- Verbaliser (prompt-based fine-tuning, as in LM-BFF, Gao et al. 2021, arXiv 2012.15723): the
  class logits are the LM's next-token logits of the label words' first tokens at the last prompt
  position, z_c = z_T[w_c], trained with cross-entropy over the C classes. Zero-shot prediction is
  argmax_c z_c, the same as comparing log p(w_c | x) for single-token words.
- Head: a linear layer on the mean-pooled last hidden states of an encoder (as sentence-transformers
  pools MiniLM), ŷ = W·mean_t(h_t) + b.

Prompts are left-padded so the last position is the last real token for every example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lfm.core.seeding import seeded
from lfm.errors import ConfigError

Batch = dict[str, torch.Tensor]


def label_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """First token id of " word" for each label word; an error if two classes share it."""
    ids = [tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"label words {list(words)} share a first token; pick distinct words")
    return ids


class VerbalizerLM(nn.Module):
    """Class logits (B, C) from a causal LM's next-token logits of the label words."""

    def __init__(self, lm: nn.Module, label_ids: Sequence[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("label_ids", torch.tensor(list(label_ids)), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        return out.logits[:, -1][:, self.label_ids]  # (B, C)

    def head_parameters(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """The output-embedding rows of the label words: (parameter, row mask) for LP-FT."""
        weight = self.lm.get_output_embeddings().weight
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[self.label_ids] = 1
        return [(weight, mask)]


class HeadClassifier(nn.Module):
    """A linear head on the mean-pooled last hidden states of an encoder."""

    def __init__(self, encoder: nn.Module, n_classes: int, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        with seeded(seed):  # the head's init is the seed's; the caller's random state is kept
            self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask
        if h.shape[1] > mask.shape[1]:  # soft prompt positions come first; they count as real
            mask = F.pad(mask, (h.shape[1] - mask.shape[1], 0), value=1)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))  # (B, C)

    def head_parameters(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        return [(p, None) for p in self.head.parameters()]


def encode(
    tokenizer: Any, texts: Sequence[str], max_length: int = 512, side: str = "left"
) -> Batch:
    """Token ids and attention mask of `texts`, padded on `side` (the tokenizer is not changed)."""
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
        padding_side=side,
    )  # fmt: skip
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def batch_order(n: int, seed: int = 0) -> list[int]:
    """The order `class_batches` visits `n` examples in (one shuffle by `seed`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def class_batches(
    tokenizer: Any, texts: Sequence[str], labels: torch.Tensor, batch_size: int, seed: int = 0,
    max_length: int = 512,
) -> list[Batch]:  # fmt: skip
    """Shuffled (once, by `seed`) mini-batches of tokenised texts with their labels."""
    order = batch_order(len(texts), seed)
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = encode(tokenizer, [texts[j] for j in idx], max_length)
        out.append({**batch, "labels": labels[idx]})
    return out


def ce_loss(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Cross-entropy over the class logits, with the batch accuracy logged beside it."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    acc = (logits.argmax(-1) == batch["labels"]).float().mean()
    return {"loss": F.cross_entropy(logits, batch["labels"]), "acc": acc.detach()}


@torch.no_grad()
def predict(model: nn.Module, batches: Sequence[Batch], desc: str | None = None) -> torch.Tensor:
    """Class logits (N, C) over `batches`, in order, in eval mode; with `desc`, a progress bar
    (stderr) over the batches."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    bar = tqdm(batches, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)
    out = [model(b["input_ids"].to(dev), b["attention_mask"].to(dev)).float().cpu() for b in bar]
    model.train(was)
    return torch.cat(out)


def accuracy_fn(batches: Sequence[Batch]) -> Callable[..., float]:
    """`f(model, desc=None) -> accuracy` over fixed evaluation batches (`desc`: show a bar)."""
    labels = torch.cat([b["labels"] for b in batches])

    def fn(model: nn.Module, desc: str | None = None) -> float:
        return float((predict(model, batches, desc).argmax(-1) == labels).float().mean())

    return fn
