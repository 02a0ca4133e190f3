"""`RemoteModel`: a served model behind the same handle protocols as a narrowed local model.

Black-box methods take a handle; given a `RemoteModel` they run unchanged against `lfm serve`
(or any server speaking the same API). The client limits concurrency, retries with exponential
backoff (wait = backoff · 2^attempt) on 429, 5xx and connection errors, caches responses (the same
request is sent once) and spends a query budget: when it is spent, `BudgetExceeded` is raised
before any further call, so a search loop can stop cleanly with its best result so far.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from lfm.access import Access, require
from lfm.errors import BudgetExceeded, LfmError
from lfm.serve.wire import pack, unpack

RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass
class Budget:
    """A limit on HTTP calls and on tokens (as the server's `usage` counts them); None: no limit."""

    calls: int | None = None
    tokens: int | None = None
    used_calls: int = 0
    used_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def charge(self) -> None:
        """Count one call, or raise `BudgetExceeded` if none is left."""
        with self._lock:
            if self.calls is not None and self.used_calls >= self.calls:
                raise BudgetExceeded(f"query budget spent: {self.used_calls} of {self.calls} calls")
            if self.tokens is not None and self.used_tokens >= self.tokens:
                raise BudgetExceeded(
                    f"token budget spent: {self.used_tokens} of {self.tokens} tokens"
                )
            self.used_calls += 1

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.used_tokens += n


class RemoteModel:
    """A handle on a served model.

    Args:
        url: the server root, e.g. "http://127.0.0.1:8000".
        api_key: sent as `Authorization: Bearer KEY`.
        access: the level this handle declares (at most what the server gives; calls above it are
            refused here, and the server refuses them too).
        max_concurrency: requests in flight at once.
        retries: further tries after a retryable failure.
        backoff: first wait in seconds, doubled at each retry.
        budget: the query budget (none by default).
        chunk: texts per request; a larger call is split and the chunks sent concurrently.
        transport: an httpx transport (tests pass `httpx.MockTransport`).
    """

    def __init__(self, url: str, api_key: str | None = None, access: Access | str = "scores",
                 max_concurrency: int = 4, retries: int = 4, backoff: float = 0.1,
                 budget: Budget | None = None, chunk: int = 16, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None, name: str | None = None):  # fmt: skip
        self.access = Access.parse(access)
        self.url, self.name = url.rstrip("/"), name or url
        self.retries, self.backoff, self.chunk = retries, backoff, chunk
        self.budget = budget or Budget()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        self._gate = threading.Semaphore(max_concurrency)
        self._pool = ThreadPoolExecutor(max_concurrency)
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.calls = self.cache_hits = 0

    def __repr__(self) -> str:
        return f"RemoteModel({self.url!r}, access={self.access.name})"

    # -- transport --

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body: cached, budgeted, retried."""
        key = path + json.dumps(body, sort_keys=True)
        with self._lock:
            if key in self._cache:
                self.cache_hits += 1
                return self._cache[key]
        out = self._send(path, body)
        with self._lock:
            self._cache[key] = out
        return out

    def _send(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """POST `body` (None: GET), budgeted and retried; one `LfmError` when it cannot."""
        for attempt in range(self.retries + 1):
            self.budget.charge()
            with self._gate:
                res = self._try(path, body)
            if isinstance(res, httpx.Response) and res.status_code not in RETRY_STATUS:
                return self._read(res)
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        why = f"HTTP {res.status_code}" if isinstance(res, httpx.Response) else res
        raise LfmError(f"{self.url}{path} failed after {self.retries + 1} tries ({why})")

    def _try(self, path: str, body: dict[str, Any] | None) -> httpx.Response | str:
        """The response, or why there is none (a connection error, or a timeout)."""
        with self._lock:
            self.calls += 1
        try:
            return self._http.get(path) if body is None else self._http.post(path, json=body)
        except httpx.TimeoutException:
            limit = self._http.timeout.read
            return (f"no answer within {limit:g} s; a slow server or long prompts need a larger "
                    "timeout, or fewer texts per request (chunk)")  # fmt: skip
        except httpx.TransportError:
            return "connection error"

    def _read(self, res: httpx.Response) -> dict[str, Any]:
        if res.status_code >= 400:
            try:
                detail = res.json().get("detail", res.text)
            except ValueError:
                detail = res.text
            raise LfmError(f"server answered {res.status_code}: {detail}")
        out = res.json()
        self.budget.add_tokens(int(out.get("usage", {}).get("total_tokens", 0)))
        return out

    def _map(self, path: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(bodies) == 1:
            return [self.post(path, bodies[0])]
        return list(self._pool.map(lambda b: self.post(path, b), bodies))

    def _chunks(self, items: Sequence[Any]) -> list[list[Any]]:
        return [list(items[i : i + self.chunk]) for i in range(0, len(items), self.chunk)]

    def info(self) -> dict[str, Any]:
        """The server's model card (`/v1/models`), fetched once."""
        if "info" not in self._cache:
            self._cache["info"] = self._send("/v1/models", None)["data"][0]
        return self._cache["info"]

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()

    # -- TEXT --

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:  # fmt: skip
        """Continue each prompt (`/v1/completions`)."""
        bodies = [{"prompt": c, "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
                  for c in self._chunks(prompts)]  # fmt: skip
        return [ch["text"] for r in self._map("/v1/completions", bodies) for ch in r["choices"]]

    # -- SCORES --

    def token_logprobs(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Per-token log-probabilities of given texts (`echo`, `max_tokens` 0, `logprobs` 0)."""
        require(self, Access.SCORES, "token_logprobs")
        bodies = [
            {"prompt": c, "max_tokens": 0, "echo": True, "logprobs": 0} for c in self._chunks(texts)
        ]
        return [ch["logprobs"] for r in self._map("/v1/completions", bodies) for ch in r["choices"]]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        """Sum of log p(continuation | prompt): the tokens of prompt+continuation ending past the prompt."""
        require(self, Access.SCORES, "score")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        lps = self.token_logprobs([p + c for p, c in zip(prompts, continuations, strict=True)])
        return torch.tensor([_sum_after(lp, len(p)) for lp, p in zip(lps, prompts, strict=True)])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (from the server's echo)."""
        lp = self.token_logprobs([text])[0]
        return [
            i
            for i, s, e in zip(lp["token_ids"], lp["text_offset"], lp["text_end"], strict=True)
            if e > s
        ]

    @property
    def vocab_size(self) -> int:
        return int(self.info()["lfm_vocab_size"])

    @property
    def top_k(self) -> int | None:
        """K when the server sends only its top-K log-probabilities per token, else None."""
        k = self.info().get("lfm_top_k")
        return None if k is None else int(k)

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        """Log-probabilities (B, V) of the next token (`/v1/lfm/next_token_logprobs`)."""
        require(self, Access.SCORES, "next_token_logprobs")
        bodies = [{"prompt": c} for c in self._chunks(prompts)]
        rows = [
            unpack(t)
            for r in self._map("/v1/lfm/next_token_logprobs", bodies)
            for t in r["logprobs"]
        ]
        return torch.stack(rows)

    def top_logprobs(
        self, rows: Sequence[Sequence[int]] | torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-`k` next-token log-probabilities at every position of given token rows (sent as
        token ids, `echo`, `max_tokens` 0, `logprobs` k): values and ids, each (B, T-1, k), where
        position t holds the distribution of token t+1. Needs the server's tokenizer (the same
        vocabulary) and its `top_token_ids` (an lfm server sends them)."""
        require(self, Access.SCORES, "top_logprobs")
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        bodies = [{"prompt": [list(map(int, r)) for r in c], "max_tokens": 0, "echo": True,
                   "logprobs": int(k)} for c in self._chunks(list(rows))]  # fmt: skip
        lps = [ch["logprobs"] for r in self._map("/v1/completions", bodies) for ch in r["choices"]]
        if lps and "top_token_ids" not in lps[0]:
            raise LfmError(f"{self.url} sends no top_token_ids: top-k log-probabilities by token "
                           "id need an lfm server")  # fmt: skip
        values = torch.tensor([lp["top_token_logprobs"][1:] for lp in lps], dtype=torch.float32)
        ids = torch.tensor([lp["top_token_ids"][1:] for lp in lps], dtype=torch.long)
        return values, ids

    # -- EMBEDDINGS --

    def embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (B, T, D), right-padded with zeros, and the mask (B, T)."""
        require(self, Access.EMBEDDINGS, "embed")
        bodies = [{"input": c} for c in self._chunks(texts)]
        rows = [unpack(t) for r in self._map("/v1/lfm/embed", bodies) for t in r["embeddings"]]
        width = max(r.shape[0] for r in rows)
        emb = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            emb[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
        return emb, mask

    def logits_from_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Logits (B, T, V) for given embeddings; with `positions` (B,) only those rows, (B, V)."""
        require(self, Access.EMBEDDINGS, "logits_from_embeds")
        bodies = []
        for i in range(0, embeds.shape[0], self.chunk):
            body = {"embeds": pack(embeds[i : i + self.chunk]),
                    "attention_mask": attention_mask[i : i + self.chunk].tolist()}  # fmt: skip
            if positions is not None:
                body["positions"] = [int(p) for p in positions[i : i + self.chunk]]
            bodies.append(body)
        rows = [
            unpack(t) for r in self._map("/v1/lfm/logits_from_embeds", bodies) for t in r["logits"]
        ]
        return torch.stack(rows) if positions is not None else _pad_stack(rows)

    # -- HIDDEN --

    def hidden(
        self, texts: Sequence[str] | Sequence[Sequence[int]] | torch.Tensor, modules: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Outputs (B, T, D) of the named modules (`/v1/lfm/hidden`) on texts, or on token rows
        (a (B, T) tensor or lists of ids, in the server's vocabulary), right-padded with zeros."""
        require(self, Access.HIDDEN, "hidden")
        items: list[Any] = (
            [[int(i) for i in r] for r in texts.tolist()]
            if isinstance(texts, torch.Tensor)
            else [t if isinstance(t, str) else [int(i) for i in t] for t in texts]
        )
        bodies = [{"input": c, "modules": list(modules)} for c in self._chunks(items)]
        rows = [r for res in self._map("/v1/lfm/hidden", bodies) for r in res["hidden"]]
        return {m: _pad_stack([unpack(r[m]) for r in rows]) for m in modules}


def _sum_after(lp: dict[str, Any], start: int) -> float:
    vals = [
        v
        for v, e in zip(lp["token_logprobs"], lp["text_end"], strict=True)
        if e > start and v is not None
    ]
    return float(sum(vals))


def _pad_stack(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), width, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
