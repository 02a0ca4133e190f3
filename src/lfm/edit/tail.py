"""Fast forward passes for the δ search: run the frozen prefix once, then only the subject's tail.

δ is added to the MLP output of one layer at the subject's last token s. Under causal attention
nothing at positions < s depends on δ, at any layer. So each row is split at s:

    prefix  = tokens [0, s)    run once, without gradients, keeping its attention keys/values
    tail    = tokens [s, end)  re-run at every Adam step, attending to the cached prefix

Rows are *left*-aligned at s (the prefixes left-padded to a common width S, the tails
right-padded), so that the subject's last token is tail column 0 in every row. Position ids are
passed explicitly and equal those of the unsplit, right-padded row; the attention mask hides the
padding. The loss is therefore the same function of δ as a full forward, up to float rounding
(`tests/edit/test_edit_tail.py` pins this for Llama, GPT-2 and Gemma 3). On SmolLM2 with 11
prefixed prompts a step re-runs 77 tail tokens instead of 187 (padded); a ROME edit takes about
1.5× less time (docs/edit.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lfm.edit.requests import Batch


@dataclass(frozen=True)
class Tail:
    """A batch split at each row's subject token, with the prefix's attention cache."""

    input_ids: torch.Tensor  # (B, T) tail tokens; column 0 is the subject's last token
    attention_mask: torch.Tensor  # (B, S + T) prefix (left-padded) then tail (right-padded)
    position_ids: torch.Tensor  # (B, T) the tokens' positions in the unsplit row
    cache: Any  # the prefix's key/value cache (never mutated; copied per pass), None if S = 0
    target_pos: list[list[int]]  # target positions, in tail columns
    target_ids: list[list[int]]


def split(batch: Batch, p: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix and tail ids of a right-padded batch: prefix left-padded to max p, tail width t."""
    lens = batch.attention_mask.sum(1)
    s = int(p.max())
    pre = torch.zeros(len(p), s, dtype=torch.long)
    tail = torch.zeros(len(p), t, dtype=torch.long)
    for i, (pi, li) in enumerate(zip(p.tolist(), lens.tolist(), strict=True)):
        pre[i, s - pi :] = batch.input_ids[i, :pi]
        tail[i, : li - pi] = batch.input_ids[i, pi:li]
    return pre, tail


def _masks(batch: Batch, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention masks of the prefix (B, s) and of prefix + tail (B, s + t); tail positions."""
    p, lens = batch.subject_pos, batch.attention_mask.sum(1)
    cols_pre, cols_tail = torch.arange(s), torch.arange(t)
    pre_mask = (cols_pre[None] >= s - p[:, None]).long()
    tail_mask = (cols_tail[None] < (lens - p)[:, None]).long()
    return pre_mask, torch.cat([pre_mask, tail_mask], 1), p[:, None] + cols_tail[None]


def prepare(model: nn.Module, batch: Batch) -> Tail:
    """Split `batch` at the subject tokens and run the prefix once (no gradients)."""
    with torch.no_grad():
        p, dev = batch.subject_pos, next(model.parameters()).device
        s, t = int(p.max()), int((batch.attention_mask.sum(1) - p).max())
        pre_ids, tail_ids = split(batch, p, t)
        pre_mask, mask, tail_pos = _masks(batch, s, t)
        cache = None
        if s > 0:
            pre_pos = (pre_mask.cumsum(1) - 1).clamp(min=0)  # positions 0..p-1 of the real tokens
            out = model(
                input_ids=pre_ids.to(dev), attention_mask=pre_mask.to(dev),
                position_ids=pre_pos.to(dev), use_cache=True, logits_to_keep=1,
            )  # fmt: skip
            cache = out.cache
        tpos = [[q - int(pi) for q in row] for row, pi in zip(batch.target_pos, p, strict=True)]
        return Tail(tail_ids, mask, tail_pos, cache, tpos, batch.target_ids)


def forward(model: nn.Module, tail: Tail, keep: Any = 1) -> torch.Tensor:
    """Logits of the tail tokens (at `keep`, as `logits_to_keep`), attending to the prefix."""
    dev = next(model.parameters()).device
    # the cache grows by the tail on every pass: give each pass its own copy of the prefix
    cache = copy.deepcopy(tail.cache) if tail.cache is not None else None
    out = model(
        input_ids=tail.input_ids.to(dev), attention_mask=tail.attention_mask.to(dev),
        position_ids=tail.position_ids.to(dev), cache=cache, use_cache=cache is not None,
        logits_to_keep=keep,
    )  # fmt: skip
    return out.logits
