"""Memory-based editing through text alone: IKE-style in-context editing with a subject scope.

IKE (Zheng et al. 2023, arXiv 2305.12740) edits no weight: the new fact is written into the
context, "New fact: {prompt} {target}." before the query. SERAC (Mitchell et al. 2022,
arXiv 2206.06520) adds a scope classifier so that unrelated queries see no edit; here the scope is
the simplest one — a stored fact is put in the context only when its subject occurs in the query —
which keeps neighbourhood prompts (other subjects) untouched by construction.

It needs TEXT access only, so it works on a narrowed or remote handle: the editor *wraps* the
handle (`MemoryEditor`), giving the same level (TEXT, or SCORES when the handle gives scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lfm.access import Access, access_of
from lfm.config import Config
from lfm.edit.requests import Request
from lfm.errors import LfmError
from lfm.registry import register


class IkeConfig(Config):
    template: str = "New fact: {prompt} {target}.\n"  # how a stored fact is written in the context
    max_facts: int = 4  # facts put before one query at most (most recent first)


class MemoryEditor:
    """A handle whose queries see the stored facts about the subjects they mention."""

    def __init__(self, handle: Any, requests: Sequence[Request], cfg: IkeConfig):
        self.base, self.facts, self.cfg = handle, list(requests), cfg
        self.access = min(access_of(handle), Access.SCORES)
        self.name = f"ike({getattr(handle, 'name', 'model')})"

    def context(self, query: str) -> str:
        """The stored facts in scope for `query` (their subject occurs in it)."""
        hits = [r for r in reversed(self.facts) if r.subject in query][: self.cfg.max_facts]
        return "".join(self.cfg.template.format(prompt=r.prompt, target=r.target) for r in hits)

    def _with_context(self, prompts: Sequence[str]) -> list[str]:
        return [self.context(p) + p for p in prompts]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **kw: Any) -> list[str]:
        return list(self.base.generate(self._with_context(prompts), max_new_tokens, **kw))

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        if self.access < Access.SCORES:
            raise LfmError(f"{self.name}: the wrapped handle gives only TEXT, not scores")
        return self.base.score(self._with_context(prompts), continuations)


def ike(target: Any, requests: Request | Sequence[Request], cfg: IkeConfig | None = None):
    """Wrap a handle (any access level) so that its answers follow the edit requests."""
    reqs = [requests] if isinstance(requests, Request) else list(requests)
    if not reqs:
        raise LfmError("no edit requests given")
    access_of(target)  # a clear error for something that is not a handle
    return MemoryEditor(target, reqs, cfg or IkeConfig())


class _EchoModel:
    """A TEXT-level stand-in that returns the last line of its prompt (for the smoke run)."""

    access = Access.TEXT
    name = "echo"

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **kw: Any) -> list[str]:
        return [p.splitlines()[0][:max_new_tokens] for p in prompts]


def _smoke(cfg: IkeConfig, seed: int) -> list[str]:
    from lfm.edit.common import SMOKE_REQUEST

    editor = ike(_EchoModel(), SMOKE_REQUEST, cfg)
    return editor.generate([SMOKE_REQUEST.prompt, "The Louvre is in"], max_new_tokens=64)


register(
    "edit", "ike", branch="memory-based", access=Access.TEXT, config=IkeConfig,
    paper="Zheng et al. 2023, arXiv 2305.12740 (IKE; subject scope as in SERAC, arXiv 2206.06520)",
    smoke=_smoke,
)(ike)  # fmt: skip
