"""Memory-based editing through text alone: the new facts in the context, with a subject scope.

IKE (Zheng et al. 2023, arXiv 2305.12740) edits no weight: the new fact is written into the
context before the query. Only that part of IKE is here: the fact itself, "New fact: {prompt}
{target}.", without IKE's retrieved in-context demonstrations (copy, update and retain examples).
SERAC (Mitchell et al. 2022, arXiv 2206.06520) adds a scope classifier so that unrelated queries
see no edit; here the scope is the simplest one — a stored fact is put in the context only when its
subject occurs in the query — which keeps neighbourhood prompts (other subjects) untouched by
construction.

It needs TEXT access only, so it works on a narrowed or remote handle. `ike(handle, requests)`
returns a `MemoryPatch`, the memory editor's patch: the requests and the config, saved as JSON.
`patch.apply(handle)` changes nothing either; it returns a `MemoryEditor` that *wraps* the handle,
giving its level up to SCORES (TEXT, or SCORES when the handle gives scores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from lfm.access import Access, TextModel, access_of, narrow
from lfm.config import Config
from lfm.core.io import write_json
from lfm.edit import common
from lfm.edit.contract import EDITOR
from lfm.edit.requests import Request
from lfm.errors import LfmError
from lfm.registry import Example, register

FORMAT = "lfm-edit-memory/1"


class IkeConfig(Config):
    template: str = "New fact: {prompt} {target}.\n"  # how a stored fact is written in the context
    max_facts: int = Field(4, ge=1)  # facts put before one query at most (most recent first)

    @field_validator("template")
    @classmethod
    def _fields(cls, template: str) -> str:
        """The template may name {prompt} and {target} only (it is filled with str.format)."""
        try:
            template.format(prompt="prompt", target="target")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise ValueError(
                f"{template!r} is not a format string over {{prompt}} and {{target}} ({e!r})"
            ) from None
        return template


class MemoryEditor:
    """A handle whose queries see the stored facts about the subjects they mention."""

    def __init__(self, handle: Any, requests: Sequence[Request], cfg: IkeConfig):
        self.base, self.facts, self.cfg = handle, list(requests), cfg
        self.access = min(access_of(handle), Access.SCORES)
        self.name = f"ike({getattr(handle, 'name', 'model')})"

    def __repr__(self) -> str:
        return f"MemoryEditor({self.name!r}, {len(self.facts)} facts, access={self.access.name})"

    def context(self, query: str) -> str:
        """The stored facts in scope for `query` (their subject occurs in it)."""
        hits = [r for r in reversed(self.facts) if r.subject in query][: self.cfg.max_facts]
        return "".join(self.cfg.template.format(prompt=r.prompt, target=r.target) for r in hits)

    def _with_context(self, prompts: Sequence[str]) -> list[str]:
        return [self.context(p) + p for p in prompts]

    def _scores(self) -> None:
        if self.access < Access.SCORES:
            raise LfmError(f"{self.name}: the wrapped handle gives only TEXT, not scores")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **kw: Any) -> list[str]:
        return list(self.base.generate(self._with_context(prompts), max_new_tokens, **kw))

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        self._scores()
        return self.base.score(self._with_context(prompts), continuations)

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        self._scores()
        return self.base.next_token_logprobs(self._with_context(prompts))


@dataclass(frozen=True)
class MemoryPatch:
    """A memory editor's patch: the facts to put in context and how. It changes no weight."""

    requests: list[Request]
    config: IkeConfig = field(default_factory=IkeConfig)
    method: str = "ike"

    def apply(self, handle: Any) -> MemoryEditor:
        """`handle` seen through the stored facts (at its level, up to SCORES)."""
        return MemoryEditor(handle, self.requests, self.config)

    def save(self, path: str | Path) -> Path:
        """Write the patch as JSON (tagged `FORMAT`), atomically."""
        data = {"format": FORMAT, "method": self.method, "config": self.config.to_dict(),
                "requests": [r.to_dict() for r in self.requests]}  # fmt: skip
        return write_json(path, data)

    @classmethod
    def load(cls, path: str | Path) -> MemoryPatch:
        """Read a patch written by `save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise LfmError(f"cannot read {path}: {e}") from None
        got = data.get("format") if isinstance(data, dict) else None
        if got != FORMAT:
            raise LfmError(f"{path} is not a {FORMAT} file (its format tag is {got!r})")
        reqs = [Request.from_dict(r) for r in data["requests"]]
        return cls(reqs, IkeConfig.build(data["config"]), str(data["method"]))


def _example(level: Access, seed: int) -> Example:
    """A tiny Llama behind a TEXT handle; the summary is its greedy answers through the patch."""
    handle = narrow(common.smoke_model("llama", seed), level)
    queries = [common.SMOKE_REQUEST.prompt, "The Colosseum is located in the city of"]

    def summary(patch: MemoryPatch) -> list[str]:
        return [*map(patch.apply(handle).context, queries),
                *patch.apply(handle).generate(queries, max_new_tokens=4)]  # fmt: skip

    return Example((handle, common.SMOKE_REQUEST), {}, None, summary)


@register(
    "edit", "ike", shape=EDITOR, branch="memory-based", access=Access.TEXT, config=IkeConfig,
    paper="Zheng et al. 2023, arXiv 2305.12740 (IKE, the new facts in context without its "
    "demonstrations; subject scope as in SERAC, arXiv 2206.06520)",
    example=_example, cli="lfm edit apply -m ike (a JSON patch; `lfm edit eval` applies it)",
)  # fmt: skip
def ike(
    handle: TextModel, requests: Request | Sequence[Request], cfg: IkeConfig | None = None
) -> MemoryPatch:
    """A memory patch for `handle` (any access level): `patch.apply(handle)` answers with the
    requested facts in context.

    Args:
        handle: the model the patch is made for; it is not changed nor kept.
        requests: the facts to store.
        cfg: how a fact is written and how many go before one query.
    """
    return MemoryPatch(common.as_requests(requests), cfg or IkeConfig())
