"""Edit requests and where their subject sits in the token sequence.

A request asks that `prompt` (which mentions `subject`) be continued by `target`, as in
CounterFact (Meng et al. 2022, arXiv 2202.05262): locate-and-edit methods read the key at the
subject's *last token*, the position where ROME's causal tracing finds the fact recalled.

Choices made here, in one place, for every method:
  - the subject is located by the fast tokenizer's character offsets, so SentencePiece's "▁"
    merges, a BOS token and multi-token subjects need no special cases; when the subject occurs
    several times in the prompt the *last* occurrence is used (the one nearest the object);
  - targets are stored without their leading space and tokenised *after* the prompt with one,
    from the joint tokenisation of `prompt + " " + target` (so " Rome" is one token, not "Rome");
  - batches are right-padded (positions of real tokens stay 0..n-1), chosen explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lfm.errors import LfmError


@dataclass(frozen=True)
class Request:
    """Make the model continue `prompt` (which contains `subject`) with `target`.

    The target is stored stripped (" London" and "London" are one request): the space before it
    is the tokenizer's, added when it is read after the prompt (`target_ids`).
    """

    prompt: str
    subject: str
    target: str

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target"):
            if not isinstance(getattr(self, name), str):
                raise LfmError(f"edit request {name} must be text, not {getattr(self, name)!r}")
        object.__setattr__(self, "target", self.target.strip())  # frozen: set once, here
        check_request(self)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        if not isinstance(data, dict):
            raise LfmError(f"an edit request is a mapping of prompt, subject, target; got {data!r}")
        missing = [k for k in ("prompt", "subject", "target") if k not in data]
        if missing:
            raise LfmError(f"an edit request needs {', '.join(missing)}; got keys {sorted(data)}")
        return cls(str(data["prompt"]), str(data["subject"]), str(data["target"]))


def check_request(r: Request) -> None:
    """Raise a one-line `LfmError` for an unusable request (nothing is touched)."""
    if not r.subject.strip():
        raise LfmError("edit request has an empty subject")
    if r.subject not in r.prompt:
        raise LfmError(f"subject {r.subject!r} does not occur in prompt {r.prompt!r}")
    if not r.target.strip():
        raise LfmError(f"edit request for {r.subject!r} has an empty target")
    if r.prompt != r.prompt.rstrip():
        raise LfmError(f"prompt {r.prompt!r} ends with whitespace; the target adds its own space")


def read_requests(path: str | Path) -> list[Request]:
    """Requests from a JSON-lines file with `prompt`, `subject`, `target` per line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LfmError(f"cannot read edit requests from {path}: {e}") from None
    try:
        requests = [Request.from_dict(json.loads(x)) for x in lines if x.strip()]
    except json.JSONDecodeError as e:
        raise LfmError(f"{path}: not JSON lines ({e})") from None
    if not requests:
        raise LfmError(f"{path} holds no edit requests (one JSON object per line)")
    return requests


def subject_last_token(tokenizer: Any, text: str, subject_end: int) -> tuple[list[int], int]:
    """Token ids of `text` and the index of the token holding character `subject_end - 1`."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < subject_end]
    if not hits:
        raise LfmError(f"cannot locate the subject in {text!r} (offsets {offsets})")
    return ids, hits[-1]


def subject_range(tokenizer: Any, prompt: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of `prompt` and the [start, end) token range of the last occurrence of
    `subject` (every token that holds one of its characters)."""
    end_char = subject_end(prompt, subject)
    ids, last = subject_last_token(tokenizer, prompt, end_char)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    start_char = end_char - len(subject)
    first = next(i for i, (s, e) in enumerate(offsets) if e > start_char and e > s)
    return ids, first, last + 1


def subject_end(prompt: str, subject: str) -> int:
    """Character index just past the last occurrence of `subject` in `prompt`."""
    return prompt.rfind(subject) + len(subject)


def target_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Ids of `" " + target` as the model would read them after `prompt`."""
    ctx = list(tokenizer(prompt)["input_ids"])
    whole = list(tokenizer(f"{prompt} {target}")["input_ids"])
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return whole[len(ctx) :]
    return list(tokenizer(f" {target}", add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids with the subject position and target positions of each row."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    subject_pos: torch.Tensor  # (B,) index of the subject's last token
    target_pos: list[list[int]]  # positions whose next-token logits predict the target
    target_ids: list[list[int]]  # the target tokens predicted there


def build_batch(
    tokenizer: Any, request: Request, prefixes: Sequence[str], with_target: bool = True
) -> Batch:
    """One row per prefix: `prefix + prompt (+ target without its last token)`.

    Args:
        tokenizer: a fast tokenizer (offset mapping needed).
        request: the edit.
        prefixes: context strings put before the prompt ("" for the bare prompt).
        with_target: append the target tokens (for the NLL of the target); else prompt only.
    """
    rows, subj, tpos, tids = [], [], [], []
    for prefix in prefixes:
        text = f"{prefix} {request.prompt}" if prefix else request.prompt
        end = len(text) - len(request.prompt) + subject_end(request.prompt, request.subject)
        ids, pos = subject_last_token(tokenizer, text, end)
        tgt = target_ids(tokenizer, text, request.target) if with_target else []
        rows.append(ids + tgt[:-1])
        subj.append(pos)
        tpos.append(list(range(len(ids) - 1, len(ids) - 1 + len(tgt))))
        tids.append(tgt)
    return _pad(tokenizer, rows, subj, tpos, tids)


def _pad(tokenizer: Any, rows: list[list[int]], subj: list[int], tpos, tids) -> Batch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # right padding, explicitly
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Batch(ids, mask, torch.tensor(subj), tpos, tids)
