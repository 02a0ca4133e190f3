"""What the server runs: batched operations over a model narrowed to the served access level.

Every operation goes through `narrow(model, level)`, so an endpoint cannot give more than the level
the server was started with. The one exception is `token_logprobs` (per-token log-probabilities
of given text, for `echo` + `logprobs`): the SCORES handle protocol has no per-token method yet, so
it is computed here from the model, and only when the level is SCORES or more. Likewise
`logits_from_embeds` with one position per row runs the output layer on those positions only
(same numbers as slicing the EMBEDDINGS handle's (B, T, V) logits, a fraction of the cost).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Hashable, Sequence
from pathlib import PurePath
from typing import Any

import torch

from lfm.access import Access, LocalModel, narrow, require
from lfm.serve.batcher import check_stop
from lfm.serve.budget import NORM_ROWS, Shape, pass_bytes
from lfm.serve.limits import chars_per_token


@torch.no_grad()
def token_logprobs(
    model: LocalModel, texts: Sequence[str | list[int]], top: int = 0
) -> list[dict[str, Any]]:
    """OpenAI-style `logprobs` of each text's own tokens (the first token gets None).

    One forward pass gives the (B, T, V) logits; they are then normalised a few positions at a
    time (log p = logit - logsumexp), so the pass holds the logits and (NORM_ROWS, V)
    temporaries, never a second (B, T, V) tensor.

    Args:
        model: the white-box model (its tokenizer must be a fast one, for character offsets).
        texts: texts to score, tokenised with special tokens as `LocalModel.score` does, or
            token-id rows, scored as given (their text is their tokens decoded one by one).
        top: how many top alternatives to return per position.
    """
    tok = model.tokenizer
    encs = [_encode(tok, t) for t in texts]
    texts = [_text_of(t, e) for t, e in zip(texts, encs, strict=True)]
    width = max(len(e["input_ids"]) for e in encs)
    ids = torch.full((len(encs), width), int(tok.pad_token_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encs):  # right padding, as in `LocalModel._score_ids`
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    logits = model.model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
    logits = logits.logits  # (B, T, V)
    return [
        _one(tok, text, e, logits[i, : len(e["input_ids"])].float(), top)
        for i, (text, e) in enumerate(zip(texts, encs, strict=True))
    ]


def _encode(tok: Any, item: str | list[int]) -> dict[str, Any]:
    """Token ids and character offsets of a text, or of token ids decoded one by one (their
    text, the pieces joined, under "text")."""
    if isinstance(item, str):
        return tok(item, return_offsets_mapping=True)
    pieces = [tok.decode([i]) for i in item]
    ends = list(itertools.accumulate(len(p) for p in pieces))
    offsets = [(e - len(p), e) for p, e in zip(pieces, ends, strict=True)]
    return {"input_ids": list(item), "offset_mapping": offsets, "text": "".join(pieces)}


def _text_of(item: str | list[int], enc: dict[str, Any]) -> str:
    return item if isinstance(item, str) else enc["text"]


def _one(tok: Any, text: str, enc: Any, logits: torch.Tensor, top: int) -> dict[str, Any]:
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # (T-1,): the normaliser of each predicting position, a few rows at a time (its temporaries
    # are rows × V, not T × V)
    last = logits.shape[0] - 1
    parts = [logits[a : min(a + NORM_ROWS, last)].logsumexp(-1) for a in range(0, last, NORM_ROWS)]
    lse = torch.cat(parts) if parts else logits[:0, 0]
    nxt = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    own = (logits[:-1].gather(-1, nxt[:, None])[:, 0] - lse).cpu().tolist()
    lps: list[float | None] = [None, *own]
    tops: list[dict[str, float] | None] = [None]
    if top:
        v, k = logits[:-1].topk(min(top, logits.shape[-1]), -1)
        v, k = (v - lse[:, None]).cpu().tolist(), k.cpu().tolist()
        names = {j: tok.decode([j]) for j in {j for row in k for j in row}}
        tops += [
            {names[j]: x for x, j in zip(vs, ks, strict=True)} for vs, ks in zip(v, k, strict=True)
        ]
        # lfm extension: the alternatives as ids and values in rank order (two ids that decode
        # to one string share a key of `top_logprobs`; these lists keep both)
        top_ids, top_values = [None, *k], [None, *v]
    return {
        "tokens": [
            text[s:e] if e > s else tok.convert_ids_to_tokens(i)
            for i, (s, e) in zip(ids, offs, strict=True)
        ],
        "token_logprobs": lps,
        "top_logprobs": tops if top else None,
        "text_offset": [s for s, _ in offs],
        "token_ids": ids,  # lfm extension: the token ids (lets a client tokenise remotely)
        "text_end": [e for _, e in offs],  # lfm extension: where each token's text ends
        **({"top_token_ids": top_ids, "top_token_logprobs": top_values} if top else {}),
    }


@torch.no_grad()
def last_logits(
    model: LocalModel, embeds: torch.Tensor, mask: torch.Tensor, positions: list[int]
) -> torch.Tensor:
    """Logits (B, V) at one position per row, without the (B, T, V) tensor.

    The output layer runs only on the distinct positions asked for (`logits_to_keep` as indices),
    which saves most of its cost and memory (V × D per position) when rows share lengths.
    """
    keep = sorted(set(positions))
    col = {p: j for j, p in enumerate(keep)}
    kw = {}
    if "logits_to_keep" in inspect.signature(model.model.forward).parameters:
        kw["logits_to_keep"] = torch.tensor(keep, device=model.device)
    out = model.model(inputs_embeds=embeds.to(model.device),
                      attention_mask=mask.to(model.device), **kw).logits  # fmt: skip
    rows = torch.arange(len(positions))
    cols = torch.tensor([col[p] for p in positions] if kw else positions)
    return out[rows, cols].float().cpu()  # (B, V)


def max_positions(config: Any) -> int | None:
    """The longest sequence the model takes (absolute position tables fail past it), if it says."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    return None


PIECE = 4  # items per forward call within a pass; a stopped pass ends between pieces


def _pieces(items: list[Any], fn: Any) -> list[Any]:
    """`fn` over `PIECE` items at a time, stopping early when the pass's requests timed out."""
    out: list[Any] = []
    for a in range(0, len(items), PIECE):
        check_stop()
        out += fn(items[a : a + PIECE])
    return out


def heads(config: Any) -> int:
    """Attention heads of a layer (the attention scores of a pass are heads × T × T)."""
    for name in ("num_attention_heads", "n_head"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    return 1


def public_name(name: str) -> str:
    """The model's name without the folders it was loaded from: no local path leaves the server."""
    return PurePath(name.replace("\\", "/")).name or "model"


class Backend:
    """The batched operations a server offers at one access level.

    Args:
        model: a white-box `LocalModel`; the backend keeps it only for `token_logprobs`.
        level: the access level served; operations above it are refused.
    """

    def __init__(self, model: LocalModel, level: Access | str):
        self.level = Access.parse(level)
        self.handle = narrow(model, self.level)
        self.name = public_name(model.name)
        self.tokenizer = model.tokenizer  # a tokenizer holds no weights
        self._model = model if self.level >= Access.SCORES else None
        self.vocab_size = int(model.vocab_size) if self.level >= Access.SCORES else None
        self.dim = int(model.model.get_input_embeddings().embedding_dim)  # a size, not weights
        self.max_positions = max_positions(model.model.config)
        self.chars_per_token = chars_per_token(self.tokenizer)
        # the module names a HIDDEN request may name (none below HIDDEN), listed once
        self.modules: frozenset[str] = frozenset(
            n for n, _ in model.model.named_modules() if n and self.level >= Access.HIDDEN
        )
        self.shape = Shape(
            vocab=int(model.vocab_size), dim=self.dim, heads=heads(model.model.config),
            keeps_logits="logits_to_keep" in inspect.signature(model.model.forward).parameters,
        )  # fmt: skip

    def ops(self) -> dict[str, Any]:
        return {"generate": self.generate, "tokens": self.tokens, "next": self.next_token,
                "embed": self.embed, "lfe": self.logits_from_embeds,
                "hidden": self.hidden, "hidden_ids": self.hidden}  # fmt: skip

    def pass_bytes(self, op: str, key: Hashable, n: int, width: int) -> int:
        """Estimated peak bytes of one pass (`lfm.serve.budget.pass_bytes`)."""
        return pass_bytes(self.shape, op, key, n, width)

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def generate(self, prompts: list[str], key: Hashable) -> list[str]:
        max_new, temperature, seed, top_p = key  # type: ignore[misc]
        return _pieces(prompts, lambda part: self.handle.generate(
            part, max_new_tokens=max_new, temperature=temperature, seed=seed, top_p=top_p))  # fmt: skip

    def tokens(self, texts: list[str], key: Hashable) -> list[dict[str, Any]]:
        require(self.handle, Access.SCORES, "echo with logprobs")
        return _pieces(texts, lambda part: token_logprobs(self._model, part, top=int(key or 0)))  # type: ignore[arg-type]

    def next_token(self, prompts: list[str], key: Hashable) -> list[torch.Tensor]:
        require(self.handle, Access.SCORES, "next-token log-probabilities")
        return _pieces(prompts, lambda part: list(self.handle.next_token_logprobs(part)))

    def embed(self, texts: list[str], key: Hashable) -> list[torch.Tensor]:
        require(self.handle, Access.EMBEDDINGS, "input embeddings")
        emb, mask = self.handle.embed(texts)  # (B, T, D), right padded
        return [emb[i, : int(mask[i].sum())] for i in range(len(texts))]

    def hidden(self, texts: list[Any], key: Hashable) -> list[dict[str, torch.Tensor]]:
        """Each text's (or token-id row's) outputs (T_i, D_m) of the modules named in `key`,
        padding cut off."""
        require(self.handle, Access.HIDDEN, "hidden states")
        modules = list(key)  # type: ignore[call-overload]

        def part(texts: list[Any]) -> list[dict[str, torch.Tensor]]:
            acts = self.handle.hidden(texts, modules)  # (B, T, D) each, right padded
            sizes = [self.n_tokens(t) if isinstance(t, str) else len(t) for t in texts]
            return [{m: acts[m][i, :n] for m in modules} for i, n in enumerate(sizes)]

        return _pieces(texts, part)

    def logits_from_embeds(self, rows: list[tuple], key: Hashable) -> list[torch.Tensor]:
        """Rows (embeds (T_i, D), mask (T_i,), position or None), right-padded into one batch."""
        require(self.handle, Access.EMBEDDINGS, "logits from embeddings")
        width, dim = max(r[0].shape[0] for r in rows), rows[0][0].shape[1]
        emb, mask = (
            torch.zeros(len(rows), width, dim),
            torch.zeros(len(rows), width, dtype=torch.long),
        )
        for i, (e, m, _) in enumerate(
            rows
        ):  # padding on the right leaves a causal LM's logits as they are
            emb[i, : e.shape[0]], mask[i, : e.shape[0]] = e, m
        if all(p is not None for _, _, p in rows) and self._model is not None:
            return list(last_logits(self._model, emb, mask, [int(p) for _, _, p in rows]))
        logits = self.handle.logits_from_embeds(emb, mask)  # (B, T, V)
        return [logits[i, p] if p is not None else logits[i, : e.shape[0]]
                for i, (e, _, p) in enumerate(rows)]  # fmt: skip
