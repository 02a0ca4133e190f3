"""Access levels and model handles.

The survey defines learning from a model by the interface the model exposes. Every method declares
the least access it needs; every handle declares the access it gives:

    TEXT < SCORES < EMBEDDINGS < HIDDEN < WEIGHTS

A white-box `LocalModel` (a language model) or `LocalClassifier` gives WEIGHTS, and so do the
plain objects that are weights by nature: an `nn.Module`, a state dict, a path to weights on disk.
`narrow(handle, level)` returns a handle that gives only `level`: it keeps no attribute that leads
to the model (only an opaque key into a private table), so a black-box method run through it
cannot reach the weights by accident. A remote client that speaks to a served model implements the
same protocols. The registry checks a handle's level before any method runs (`lfm.registry.run`).

Handles never change what they are given: the caller's tokenizer keeps its settings (padding is
done here) and the global random state is the same after a call as before it.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast, runtime_checkable

import torch
from torch import nn

from lfm.core import placement
from lfm.core.hooks import capture
from lfm.core.seeding import seeded
from lfm.errors import AccessError
from lfm.levels import Access

__all__ = [
    "Access",
    "ClassHiddenHandle",
    "ClassHiddenModel",
    "ClassScoresHandle",
    "ClassScoresModel",
    "EmbeddingsHandle",
    "EmbeddingsModel",
    "HiddenHandle",
    "HiddenModel",
    "LabelModel",
    "LabelsHandle",
    "LocalClassifier",
    "LocalModel",
    "ScoresHandle",
    "ScoresModel",
    "TextHandle",
    "TextModel",
    "access_of",
    "capture",
    "levels",
    "module_of",
    "narrow",
    "require",
    "state_dict_of",
]


def access_of(handle: Any) -> Access:
    """The access level a handle declares; weights in any plain form (a module, a state dict, a
    path to a weights file or folder) give WEIGHTS."""
    level = getattr(handle, "access", None)
    if isinstance(level, Access):
        return level
    if isinstance(handle, nn.Module | str | Path) or _is_state_dict(handle):
        return Access.WEIGHTS
    raise AccessError(
        f"{type(handle).__name__} is not a model handle (it declares no access level)"
    )


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and all(isinstance(v, torch.Tensor) for v in x.values())


def module_of(handle: Any, what: str = "this method") -> nn.Module:
    """The `nn.Module` behind a white-box handle (a `LocalModel`, `LocalClassifier` or module)."""
    require(handle, Access.WEIGHTS, what)
    if isinstance(handle, nn.Module):
        return handle
    model = getattr(handle, "model", None)
    if not isinstance(model, nn.Module):
        raise AccessError(f"{what} needs a model in memory, not {type(handle).__name__}")
    return model


def state_dict_of(handle: Any, what: str = "this method") -> Mapping[str, torch.Tensor]:
    """The parameters and buffers of a white-box handle (a state dict is returned as it is)."""
    if _is_state_dict(handle):
        return handle
    return module_of(handle, what).state_dict()


def require(handle: Any, level: Access, what: str) -> None:
    """Raise `AccessError` naming both levels if `handle` gives less than `level`."""
    got = access_of(handle)
    if got < level:
        raise AccessError(f"{what} needs {level.name} access, but the handle gives only {got.name}")


# --------------------------------------------------------------------------------------------
# Protocols: what a handle at each level offers. Local, narrowed and remote handles implement them.


@runtime_checkable
class TextModel(Protocol):
    access: Access

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]: ...


@runtime_checkable
class ScoresModel(TextModel, Protocol):
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor: ...

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def top_logprobs(
        self, rows: Sequence[Sequence[int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class EmbeddingsModel(ScoresModel, Protocol):
    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def logits_from_embeds(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class HiddenModel(EmbeddingsModel, Protocol):
    def hidden(  # texts, or token rows (B, T)
        self, texts: Sequence[str] | torch.Tensor, modules: Sequence[str]
    ) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class LabelModel(Protocol):
    """A classifier that answers with labels (hard-label black box)."""

    access: Access

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ClassScoresModel(LabelModel, Protocol):
    def scores(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ClassHiddenModel(ClassScoresModel, Protocol):
    def hidden(self, x: torch.Tensor, modules: Sequence[str]) -> dict[str, torch.Tensor]: ...


# --------------------------------------------------------------------------------------------
# The white-box handles.


class LocalModel:
    """A language model and its tokenizer held in this process: WEIGHTS access.

    Args:
        model: a causal LM (`AutoModelForCausalLM`-like: `forward(input_ids, attention_mask)`
            returning `.logits`), or an encoder for the methods that need one.
        tokenizer: its tokenizer; a pad token is set to EOS when the tokenizer has none.
        name: a display name (the asset name or path it came from).
        batch_size: how many texts one forward pass takes.
    """

    access: ClassVar[Access] = Access.WEIGHTS

    def __init__(self, model: nn.Module, tokenizer: Any, name: str = "model", batch_size: int = 16):
        self.model: Any = model  # a transformers model; typed loosely for its many helpers
        self.name = name
        self.batch_size = batch_size
        if getattr(tokenizer, "pad_token_id", None) is None and tokenizer.eos_token is not None:
            tokenizer = copy.deepcopy(
                tokenizer
            )  # pad with EOS on a copy: the caller's is unchanged
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"LocalModel({self.name!r}, access=WEIGHTS)"

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device (for one spread by a `device_map`, its input
        embeddings' execution device)."""
        return placement.device_of(self.model)

    # -- tokenisation (shared by every level: a tokenizer holds no weights) --

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _batch(self, texts: Sequence[str], side: str) -> dict[str, torch.Tensor]:
        """Token ids and mask (B, T) padded on `side`, without touching the tokenizer's settings."""
        return self._pad([list(r) for r in self.tokenizer(list(texts))["input_ids"]], side)

    def _pad(self, rows: Sequence[Sequence[int]], side: str) -> dict[str, torch.Tensor]:
        """Token rows as ids and mask (B, T), padded with the pad token on `side`."""
        width = max((len(r) for r in rows), default=0)
        ids = torch.full(
            (len(rows), width), int(self.tokenizer.pad_token_id or 0), dtype=torch.long
        )
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols], mask[i, cols] = torch.tensor(list(r), dtype=torch.long), 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    # -- TEXT --

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Continue each prompt; greedy when `temperature` is 0, else sampled under `seed` from
        the smallest set of tokens whose probabilities sum to `top_p` (nucleus sampling; 1: all)
        (the global random state is left as it was)."""
        with torch.no_grad():
            outs: list[str] = []
            sample = temperature > 0
            gen: dict[str, Any] = {"do_sample": False}
            if sample:
                gen = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            for chunk in _chunks(prompts, self.batch_size):
                enc = self._batch(chunk, side="left")
                with seeded(seed):
                    ids = self.model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        **gen,
                    )
                new = ids[:, enc["input_ids"].shape[1] :]
                outs += self.tokenizer.batch_decode(new, skip_special_tokens=True)
            return outs

    # -- SCORES --

    def _split_ids(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of prompt and continuation, split where the joint tokenisation allows."""
        ctx = list(self.tokenizer(prompt)["input_ids"])
        whole = list(self.tokenizer(prompt + continuation)["input_ids"])
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.encode(continuation)

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        """Sum of log p(continuation | prompt) for each pair, shape (B,)."""
        with torch.no_grad():
            if len(prompts) != len(continuations):
                raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
            out = []
            for chunk in _chunks(list(zip(prompts, continuations, strict=True)), self.batch_size):
                pairs = [self._split_ids(p, c) for p, c in chunk]
                out.append(self._score_ids(pairs))
            return torch.cat(out) if out else torch.zeros(0)

    def _score_ids(self, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        pad = int(self.tokenizer.pad_token_id)
        seqs = [c + t for c, t in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # right padding: positions of the real tokens stay 0..n-1
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logp = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        logp = logp.float().log_softmax(-1)  # (B, T, V)
        totals = []
        for i, (ctx, tgt) in enumerate(pairs):
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(tgt) - 1, device=logp.device)
            totals.append(logp[i, pos, torch.tensor(tgt, device=logp.device)].sum())
        return torch.stack(totals).cpu()

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt, shape (B, V)."""
        with torch.no_grad():
            out = []
            for chunk in _chunks(prompts, self.batch_size):
                enc = self._batch(chunk, side="left")
                out.append(self.model(**enc).logits[:, -1].float().log_softmax(-1).cpu())
            return torch.cat(out)

    def top_logprobs(
        self, rows: Sequence[Sequence[int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-`k` next-token log-probabilities at every position of given token rows, as an
        API with `echo` and `logprobs=k` answers them: values and token ids, each (B, T-1, k),
        where position t holds the distribution of token t+1 given tokens ≤ t (rows of one
        length T ≥ 2)."""
        with torch.no_grad():
            ids = _id_rows(rows)
            out_v, out_i = [], []
            for i in range(0, len(ids), self.batch_size):
                logits = self.model(input_ids=ids[i : i + self.batch_size].to(self.device)).logits
                v, j = logits[:, :-1].float().log_softmax(-1).topk(min(k, logits.shape[-1]), -1)
                out_v.append(v.cpu())
                out_i.append(j.cpu())
            return torch.cat(out_v), torch.cat(out_i)

    # -- EMBEDDINGS --

    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (B, T, D) and attention mask (B, T) of right-padded texts."""
        with torch.no_grad():
            enc = self._batch(texts, side="right")
            return self.model.get_input_embeddings()(enc["input_ids"]).cpu(), enc[
                "attention_mask"
            ].cpu()

    def logits_from_embeds(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, T, V) for given input embeddings."""
        with torch.no_grad():
            out = self.model(
                inputs_embeds=embeds.to(self.device), attention_mask=attention_mask.to(self.device)
            )
            return out.logits.float().cpu()

    # -- HIDDEN --

    def module_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    def hidden(
        self, texts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor, modules: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Outputs (B, T, D) of the named modules on right-padded texts, or on token rows (a
        (B, T) tensor, or lists of ids, padded on the right when their lengths differ)."""
        with torch.no_grad():
            if _texts(texts):
                enc = self._batch(cast(Sequence[str], texts), side="right")
            else:
                rows = texts.tolist() if isinstance(texts, torch.Tensor) else texts
                enc = self._pad(cast(Sequence[Sequence[int]], rows), side="right")
            with capture(self.model, modules) as acts:
                self.model(**enc)
            return {k: v.cpu() for k, v in acts.items()}


class LocalClassifier:
    """An image or feature classifier held in this process: WEIGHTS access.

    `scores(x)` gives log-probabilities (B, C), `hidden(x, modules)` the outputs of named modules;
    narrowed to HIDDEN it gives both, to SCORES only the first, to TEXT only labels.
    """

    access: ClassVar[Access] = Access.WEIGHTS

    def __init__(self, model: nn.Module, name: str = "classifier"):
        self.model = model
        self.name = name

    def __repr__(self) -> str:
        return f"LocalClassifier({self.name!r}, access=WEIGHTS)"

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).float().log_softmax(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x).argmax(-1)

    def module_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    def hidden(self, x: torch.Tensor, modules: Sequence[str]) -> dict[str, torch.Tensor]:
        """Outputs of the named modules on `x` (one forward pass)."""
        with torch.no_grad():
            with capture(self.model, modules) as acts:
                self.model(x)
            return dict(acts)


# --------------------------------------------------------------------------------------------
# Narrowed handles. They keep an opaque integer key into `_BACKENDS`, never the model itself.

_BACKENDS: dict[int, Any] = {}
_KEYS = itertools.count()


class _Narrow:
    __slots__ = ("__weakref__", "_key", "name")
    access: ClassVar[Access]

    def __init__(self, backend: Any, name: str):
        self._key = next(_KEYS)
        self.name = name
        _BACKENDS[self._key] = backend
        weakref.finalize(self, _BACKENDS.pop, self._key, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, access={self.access.name})"

    def _b(self) -> Any:
        return _BACKENDS[self._key]

    def __copy__(self) -> _Narrow:
        return type(self)(self._b(), self.name)  # its own key: it outlives the original

    def __deepcopy__(self, memo: dict) -> _Narrow:
        return self.__copy__()  # the model stays behind the interface; the copy shares it

    def __reduce__(self) -> Any:
        raise TypeError(f"a {type(self).__name__} cannot be pickled (it reaches a model in memory)")


class TextHandle(_Narrow):
    """Text in, text out."""

    __slots__ = ()
    access = Access.TEXT

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **kw: Any) -> list[str]:
        return list(self._b().generate(prompts, max_new_tokens=max_new_tokens, **kw))


class ScoresHandle(TextHandle):
    """Adds log-probabilities of given text."""

    __slots__ = ()
    access = Access.SCORES

    @property
    def vocab_size(self) -> int:
        return int(self._b().vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self._b().encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._b().decode(ids))

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        return self._b().score(prompts, continuations).detach().clone()

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._b().next_token_logprobs(prompts).detach().clone()

    def top_logprobs(
        self, rows: Sequence[Sequence[int]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = self._b().top_logprobs(rows, k)
        return v.detach().clone(), i.detach().clone()


class EmbeddingsHandle(ScoresHandle):
    """Adds scores for given input embeddings."""

    __slots__ = ()
    access = Access.EMBEDDINGS

    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        e, m = self._b().embed(texts)
        return e.detach().clone(), m.clone()

    def logits_from_embeds(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self._b().logits_from_embeds(embeds.detach(), attention_mask).detach().clone()


class HiddenHandle(EmbeddingsHandle):
    """Adds activations at named modules."""

    __slots__ = ()
    access = Access.HIDDEN

    def module_names(self) -> list[str]:
        return list(self._b().module_names())

    def hidden(
        self, texts: Sequence[str] | torch.Tensor, modules: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._b().hidden(texts, modules).items()}


class LabelsHandle(_Narrow):
    """A classifier that answers with labels only (hard-label black box): TEXT."""

    __slots__ = ()
    access = Access.TEXT

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._b().predict(x.detach()).clone()


class ClassScoresHandle(LabelsHandle):
    """A classifier that answers with log-probabilities over its classes."""

    __slots__ = ()
    access = Access.SCORES

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self._b().scores(x.detach()).detach().clone()


class ClassHiddenHandle(ClassScoresHandle):
    """A classifier that also answers with the outputs of its named modules: HIDDEN.

    A classifier's inputs are already vectors or images, so it has no EMBEDDINGS level of its own:
    a method that needs EMBEDDINGS is served by this handle or refused by a SCORES one.
    """

    __slots__ = ()
    access = Access.HIDDEN

    def module_names(self) -> list[str]:
        return list(self._b().module_names())

    def hidden(self, x: torch.Tensor, modules: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._b().hidden(x.detach(), modules).items()}


_LM_HANDLES = {h.access: h for h in (TextHandle, ScoresHandle, EmbeddingsHandle, HiddenHandle)}
_CLASSIFIER_HANDLES = {h.access: h for h in (LabelsHandle, ClassScoresHandle, ClassHiddenHandle)}


def _backend(handle: Any) -> Any:
    return handle._b() if isinstance(handle, _Narrow) else handle


def _table(backend: Any) -> Mapping[Access, type[_Narrow]]:
    """The narrowed handles for a backend: a classifier's (`predict`) or a language model's."""
    if isinstance(backend, LocalClassifier):
        return _CLASSIFIER_HANDLES
    if not isinstance(backend, LocalModel) and hasattr(backend, "predict"):
        return _CLASSIFIER_HANDLES
    return _LM_HANDLES


def levels(handle: Any) -> list[Access]:
    """The levels `narrow` can give for `handle`, from TEXT up to the handle's own level."""
    got = access_of(handle)
    if isinstance(handle, nn.Module | str | Path) or _is_state_dict(handle):
        return [got]
    return [lv for lv in (*_table(_backend(handle)), Access.WEIGHTS) if lv <= got]


def narrow(handle: Any, level: Access | str) -> Any:
    """A handle over the same model that gives only `level` access.

    Args:
        handle: a `LocalModel`, a `LocalClassifier` or an already narrowed handle.
        level: the access to keep; it cannot exceed what `handle` gives.
    """
    level = Access.parse(level)
    got = access_of(handle)
    if level > got:
        raise AccessError(f"cannot widen a {got.name} handle to {level.name}")
    if level == got:
        return handle
    backend = _backend(handle)
    if isinstance(backend, nn.Module | str | Path) or _is_state_dict(backend):
        raise AccessError(
            f"a bare {type(backend).__name__} cannot be narrowed; wrap it in a LocalModel or "
            "LocalClassifier first"
        )
    table = _table(backend)
    if level not in table:
        kinds = ", ".join(lv.name for lv in table)
        raise AccessError(f"a {type(backend).__name__} narrows only to {kinds}, not {level.name}")
    return table[level](backend, name=handle.name)


def _texts(items: Any) -> bool:
    """Whether `items` are texts rather than token rows."""
    return not isinstance(items, torch.Tensor) and (not items or isinstance(items[0], str))


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _id_rows(rows: Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
    """Token rows as a (B, T) long tensor; rows of unequal length, or shorter than 2, are a
    `ValueError` (every position but the last predicts a token that is there)."""
    if isinstance(rows, torch.Tensor):
        ids = rows.long()
    else:
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise ValueError(f"token rows of unequal lengths {sorted(lengths)}")
        ids = torch.tensor([list(r) for r in rows], dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"token rows must be (B, T ≥ 2), not {tuple(ids.shape)}")
    return ids
