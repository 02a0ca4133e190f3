"""IKE: in-context knowledge editing with retrieved demonstrations (Zheng et al. 2023,
arXiv 2305.12740).

IKE edits no weight. The new fact f = (prompt, new object) goes in the context, after k
demonstrations that teach the model how to use a new fact, each written

    New Fact: {fact prompt} {fact's new object}
    Prompt: {query} {answer}

of three kinds, built from other facts of the fact set (`lfm.edit.facts`):
  copy     the query is the fact's own prompt, answered with its new object;
  update   the query is a paraphrase of it, answered with the new object;
  retain   the query is a neighbourhood prompt (another subject), answered with its *true* object,
           which teaches the model to leave unrelated facts alone.
The model then reads "New Fact: {prompt} {target}\\nPrompt: {query}" and continues it. The
demonstrations are those most similar to that text (cosine of sentence embeddings, the paper's
all-MiniLM-L6-v2: asset `minilm-l6`), in the proportions `ratio` (copy : update : retain), and are
put in order of increasing similarity, the most similar nearest the query, as in the paper. With
several stored facts, a query gets the one most similar to it.

It needs TEXT access only, so it works on a narrowed or remote handle. `ike(handle, requests)`
returns a `MemoryPatch`: the requests and the config, saved as JSON. `patch.apply(handle)` changes
nothing either; it returns a `MemoryEditor` that *wraps* the handle, giving its level up to
SCORES (TEXT, or SCORES when the handle gives scores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lfm.access import Access, TextModel, access_of, narrow
from lfm.assets.embed import Embedder, char_embedder, minilm_embedder
from lfm.config import Config
from lfm.core.io import write_json
from lfm.edit import common
from lfm.edit.contract import EDITOR
from lfm.edit.facts import Fact, load_facts, read_facts
from lfm.edit.requests import Request
from lfm.errors import LfmError
from lfm.registry import Example, register

FORMAT = "lfm-edit-memory/1"
KINDS = ("copy", "update", "retain")


class IkeConfig(Config):
    # demonstrations per query (the paper: 32). 32 demonstrations of the fact set are about 1,000
    # SmolLM2 tokens (~30 each): well inside its 8,192-token context
    k: int = Field(32, ge=0)
    # copy : update : retain demonstrations among the k (more retain than update than copy:
    # chosen here, the paper's exact mix is not reproduced)
    ratio: tuple[int, int, int] = (1, 3, 4)
    # sentence encoder for retrieval: "minilm-l6" (the paper's all-MiniLM-L6-v2, an asset) or
    # "chars" (a bag of characters, no asset: tests and offline use)
    encoder: Literal["minilm-l6", "chars"] = "minilm-l6"
    # the demonstrations' facts: a JSON-lines file (`facts.read_facts`); None: the packaged set
    facts: str | None = None


@dataclass(frozen=True)
class Demo:
    """One demonstration: a new fact, a query and the answer a model should give."""

    kind: str  # copy, update or retain
    fact: str  # "{prompt} {new object}"
    query: str
    answer: str

    @property
    def text(self) -> str:
        return f"New Fact: {self.fact}\nPrompt: {self.query} {self.answer}\n\n"


def demonstrations(facts: Sequence[Fact], avoid: Sequence[str] = ()) -> list[Demo]:
    """Copy, update and retain demonstrations of `facts`, less any naming a subject in `avoid`
    (the edited subjects: a demonstration about them would contradict or give away the edit)."""
    out = []
    for f in facts:
        if not f.true:  # a retain demonstration needs the object before the edit
            continue
        fact = f"{f.prompt} {f.new}"
        out.append(Demo("copy", fact, f.prompt, f.new))
        out += [Demo("update", fact, p, f.new) for p in f.paraphrases]
        out += [Demo("retain", fact, n, f.true) for n in f.neighbourhood]
    return [d for d in out if not any(s in d.fact or s in d.query for s in avoid)]


def quotas(k: int, ratio: Sequence[int]) -> list[int]:
    """k split in proportion to `ratio` (largest remainders; ties to the earlier kind)."""
    total = sum(ratio)
    exact = [k * r / total for r in ratio]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratio)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return counts


def select(sims: torch.Tensor, kinds: Sequence[str], k: int, ratio: Sequence[int]) -> list[int]:
    """Indices of the demonstrations to use: the most similar of each kind, in `ratio`, ordered
    by increasing similarity (the most similar last, nearest the query)."""
    chosen: list[int] = []
    for kind, n in zip(KINDS, quotas(k, ratio), strict=True):
        idx = [i for i, x in enumerate(kinds) if x == kind]
        top = sims[idx].argsort(descending=True)[:n] if idx else []
        chosen += [idx[int(j)] for j in top]
    return sorted(chosen, key=lambda i: (float(sims[i]), i))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)


class MemoryEditor:
    """A handle whose queries are preceded by IKE's demonstrations and the nearest new fact."""

    def __init__(
        self, handle: Any, requests: Sequence[Request], cfg: IkeConfig, embed: Embedder,
        facts: Sequence[Fact],
    ):  # fmt: skip
        self.base, self.facts, self.cfg, self.embed = handle, list(requests), cfg, embed
        self.pool = demonstrations(facts, [r.subject for r in self.facts])
        self.access = min(access_of(handle), Access.SCORES)
        self.name = f"ike({getattr(handle, 'name', 'model')})"

    def __repr__(self) -> str:
        return f"MemoryEditor({self.name!r}, {len(self.facts)} facts, access={self.access.name})"

    @cached_property
    def _pool_keys(self) -> torch.Tensor:  # (N, E), embedded once per editor
        return _unit(self.embed([d.text for d in self.pool])) if self.pool else torch.zeros(0, 1)

    @cached_property
    def _fact_keys(self) -> torch.Tensor:
        return _unit(self.embed([f"New Fact: {r.prompt} {r.target}" for r in self.facts]))

    def fact_for(self, query: str) -> Request:
        """The stored fact most similar to `query` (the only one when one is stored)."""
        if len(self.facts) == 1:
            return self.facts[0]
        sims = self._fact_keys @ _unit(self.embed([query]))[0]
        return self.facts[int(sims.argmax())]

    def demonstrations(self, query: str) -> list[tuple[Demo, float]]:
        """The demonstrations put before `query`, with their similarity, in context order."""
        if not self.pool or self.cfg.k == 0:
            return []
        r = self.fact_for(query)
        sims = self._pool_keys @ _unit(self.embed([_head(r) + query]))[0]
        chosen = select(sims, [d.kind for d in self.pool], self.cfg.k, self.cfg.ratio)
        return [(self.pool[i], float(sims[i])) for i in chosen]

    def context(self, query: str) -> str:
        """What goes before `query`: the demonstrations, then the new fact and "Prompt: "."""
        demos = "".join(d.text for d, _ in self.demonstrations(query))
        return demos + _head(self.fact_for(query))

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


def _head(r: Request) -> str:
    return f"New Fact: {r.prompt} {r.target}\nPrompt: "


@dataclass(frozen=True)
class MemoryPatch:
    """A memory editor's patch: the facts to put in context and how. It changes no weight.

    `embed` and `facts` (the encoder and the demonstrations' facts) are not saved: by default
    they follow the config (`encoder`, `facts`)."""

    requests: list[Request]
    config: IkeConfig = field(default_factory=IkeConfig)
    method: str = "ike"
    embed: Embedder | None = field(default=None, compare=False, repr=False)
    facts: Sequence[Fact] | None = field(default=None, compare=False, repr=False)

    def apply(self, handle: Any) -> MemoryEditor:
        """`handle` seen through the stored facts (at its level, up to SCORES)."""
        cfg = self.config
        embed = self.embed or (char_embedder if cfg.encoder == "chars" else minilm_embedder())
        facts = self.facts
        if facts is None:
            facts = read_facts(cfg.facts) if cfg.facts else load_facts()
        return MemoryEditor(handle, self.requests, cfg, embed, facts)

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


# The registry example's demonstrations: two facts in the smoke model's words.
SMOKE_FACTS = (
    Fact(0, "city", "Colosseum", "The city of the Colosseum", "Rome", "Paris",
         ("The Colosseum is located in the city of",), ("The city of the Tower",)),
    Fact(1, "capital", "Berlin", "Berlin is the capital of", "Germany", "Japan",
         ("The capital Berlin is in",), ("Tokyo is the capital of",)),
)  # fmt: skip


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """A tiny Llama behind a TEXT handle; the summary is its greedy answers through the patch."""
    handle = narrow(common.smoke_model("llama", seed), level)
    queries = [common.SMOKE_REQUEST.prompt, "The Colosseum is located in the city of"]
    cfg = IkeConfig(k=4, encoder="chars")

    def summary(patch: MemoryPatch) -> list[str]:
        editor = patch.apply(handle)
        return [*map(editor.context, queries), *editor.generate(queries, max_new_tokens=4)]

    return Example((handle, common.SMOKE_REQUEST), {"facts": SMOKE_FACTS}, cfg, summary)


# pragma: no mutate end


def ike(
    handle: TextModel,
    requests: Request | Sequence[Request],
    cfg: IkeConfig | None = None,
    *,
    embed: Embedder | None = None,
    facts: Sequence[Fact] | None = None,
) -> MemoryPatch:
    """A memory patch for `handle` (any access level): `patch.apply(handle)` answers with IKE's
    demonstrations and the requested fact in context.

    Args:
        handle: the model the patch is made for; it is not changed nor kept.
        requests: the facts to store.
        cfg: k, the kinds' ratio, the encoder and the demonstrations' fact file.
        embed: texts -> (N, E) sentence embeddings, instead of `cfg.encoder`.
        facts: the demonstrations' facts, instead of `cfg.facts`.
    """
    return MemoryPatch(common.as_requests(requests), cfg or IkeConfig(), embed=embed, facts=facts)


ike = register(
    "edit", "ike", shape=EDITOR, branch="memory-based", access=Access.TEXT, config=IkeConfig,
    paper="Zheng et al. 2023, arXiv 2305.12740", example=_example,
    cli="lfm edit eval -m ike --facts F (metrics before and with IKE; `apply -m ike` saves a patch)",
)(ike)  # fmt: skip
