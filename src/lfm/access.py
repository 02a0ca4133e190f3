"""Access levels and model handles.

The survey defines learning from a model by the interface the model exposes. Every method declares
the least access it needs; every handle declares the access it gives:

    TEXT < SCORES < EMBEDDINGS < HIDDEN < WEIGHTS

A white-box `LocalModel` gives WEIGHTS. `narrow(handle, level)` returns a handle that gives only
`level`: it keeps no attribute that leads to the model (only an opaque key into a private table),
so a black-box method run through it cannot reach the weights by accident. A remote client that
speaks to a served model implements the same protocols.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from lfm.errors import AccessError


class Access(IntEnum):
    """What a model interface exposes, from least to most."""

    TEXT = 1  # text in, text out (labels for a classifier)
    SCORES = 2  # log-probabilities of given inputs
    EMBEDDINGS = 3  # scores for given input embeddings
    HIDDEN = 4  # activations at named modules
    WEIGHTS = 5  # parameters, gradients, writes

    @classmethod
    def parse(cls, value: str | int | Access) -> Access:
        """Read a level from its name (any case) or number; a clear error otherwise."""
        if isinstance(value, Access):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            names = ", ".join(level.name.lower() for level in cls)
            raise AccessError(f"unknown access level {value!r}; choose one of: {names}") from None

    def __str__(self) -> str:
        return self.name


def access_of(handle: Any) -> Access:
    """The access level a handle declares."""
    level = getattr(handle, "access", None)
    if not isinstance(level, Access):
        raise AccessError(
            f"{type(handle).__name__} is not a model handle (it declares no access level)"
        )
    return level


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


@runtime_checkable
class EmbeddingsModel(ScoresModel, Protocol):
    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def logits_from_embeds(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class HiddenModel(EmbeddingsModel, Protocol):
    def hidden(self, texts: Sequence[str], modules: Sequence[str]) -> dict[str, torch.Tensor]: ...


# --------------------------------------------------------------------------------------------
# The white-box handle.


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
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        if getattr(tokenizer, "pad_token_id", None) is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token

    def __repr__(self) -> str:
        return f"LocalModel({self.name!r}, access=WEIGHTS)"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- tokenisation (shared by every level: a tokenizer holds no weights) --

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _batch(self, texts: Sequence[str], side: str) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = side
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {
            k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
        }

    # -- TEXT --

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """Continue each prompt; greedy when `temperature` is 0."""
        outs: list[str] = []
        sample = temperature > 0
        gen = {"do_sample": sample, "temperature": temperature} if sample else {"do_sample": False}
        for chunk in _chunks(prompts, self.batch_size):
            torch.manual_seed(seed)
            enc = self._batch(chunk, side="left")
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

    @torch.no_grad()
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        """Sum of log p(continuation | prompt) for each pair, shape (B,)."""
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

    @torch.no_grad()
    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Log-probabilities of the next token after each prompt, shape (B, V)."""
        out = []
        for chunk in _chunks(prompts, self.batch_size):
            enc = self._batch(chunk, side="left")
            out.append(self.model(**enc).logits[:, -1].float().log_softmax(-1).cpu())
        return torch.cat(out)

    # -- EMBEDDINGS --

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (B, T, D) and attention mask (B, T) of right-padded texts."""
        enc = self._batch(texts, side="right")
        return self.model.get_input_embeddings()(enc["input_ids"]).cpu(), enc[
            "attention_mask"
        ].cpu()

    @torch.no_grad()
    def logits_from_embeds(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, T, V) for given input embeddings."""
        out = self.model(
            inputs_embeds=embeds.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return out.logits.float().cpu()

    # -- HIDDEN --

    def module_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    @torch.no_grad()
    def hidden(self, texts: Sequence[str], modules: Sequence[str]) -> dict[str, torch.Tensor]:
        """Outputs (B, T, D) of the named modules on right-padded texts."""
        enc = self._batch(texts, side="right")
        with capture(self.model, modules) as acts:
            self.model(**enc)
        return {k: v.cpu() for k, v in acts.items()}


@contextmanager
def capture(model: nn.Module, modules: Sequence[str], detach: bool = True):
    """Record the outputs of named modules during forward passes; unknown names are an error.

    Args:
        model: the module to watch (it is not changed; the hooks are removed on exit).
        modules: names as in `model.named_modules()`.
        detach: drop the autograd graph (keep it to train through the features).
    """
    table = dict(model.named_modules())
    missing = [m for m in modules if m not in table]
    if missing:
        raise AccessError(f"no module named {', '.join(missing)} in {type(model).__name__}")
    acts: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, _inp: Any, out: Any) -> None:
            out = out[0] if isinstance(out, tuple) else out
            acts[name] = out.detach() if detach else out

        return fn

    handles = [table[m].register_forward_hook(hook(m)) for m in modules]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


class LocalClassifier:
    """An image or feature classifier held in this process: WEIGHTS access.

    `scores(x)` gives log-probabilities (B, C); narrowed to TEXT it gives only labels.
    """

    access: ClassVar[Access] = Access.WEIGHTS

    def __init__(self, model: nn.Module, name: str = "classifier"):
        self.model = model
        self.name = name

    def __repr__(self) -> str:
        return f"LocalClassifier({self.name!r}, access=WEIGHTS)"

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().log_softmax(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x).argmax(-1)

    @torch.no_grad()
    def hidden(self, x: torch.Tensor, modules: Sequence[str]) -> dict[str, torch.Tensor]:
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

    def hidden(self, texts: Sequence[str], modules: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._b().hidden(texts, modules).items()}


class LabelsHandle(_Narrow):
    """A classifier that answers with labels only (hard-label black box)."""

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


_LM_HANDLES = {h.access: h for h in (TextHandle, ScoresHandle, EmbeddingsHandle, HiddenHandle)}
_CLASSIFIER_HANDLES = {h.access: h for h in (LabelsHandle, ClassScoresHandle)}


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
    if level == Access.WEIGHTS:
        return handle
    backend = handle._b() if isinstance(handle, _Narrow) else handle
    table = _CLASSIFIER_HANDLES if isinstance(backend, LocalClassifier) else _LM_HANDLES
    if level not in table:
        kinds = ", ".join(lv.name for lv in table)
        raise AccessError(f"a {type(backend).__name__} narrows only to {kinds}, not {level.name}")
    return table[level](backend, name=handle.name)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
