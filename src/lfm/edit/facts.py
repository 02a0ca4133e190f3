"""CounterFact-style facts and the metrics of ROME's evaluation (Meng et al. 2022, arXiv 2202.05262).

`data/facts.jsonl` holds 316 real-world facts written for this project (landmark → city,
city → country, country → continent, country → language, company → country). Each record has a
prompt ending where the object comes, the true object, a counterfactual new object (another
object of the same relation), 2 paraphrase prompts and 5 neighbourhood prompts (other subjects
with the same relation and true object). `data/lifelong.jsonl` (`load_facts(name="lifelong")`)
holds 1,496 more, for lifelong editing, written by `tools/make_lifelong_facts.py` from templates
over eight relations, each with a `split` (`train` 431, `test` 1,065) for a meta-learned editor;
where no other subject shares a fact's true object it has no neighbourhood prompts.

Metrics, on the edited model, with the CounterFact protocol (probabilities of whole objects,
compared pairwise; each a percentage over records):
  efficacy       P(new) > P(true) on the edited prompt
  paraphrase     the same on the paraphrase prompts (mean per record)
  neighbourhood  P(true) > P(new) on the neighbourhood prompts (mean per record)
  score          harmonic mean of the three
  generation     greedy continuation of the generation prompt mentions the new object
  fluency        ROME's n-gram entropy of the generated text: (2/3)·H₂ + (4/3)·H₃, bits

Through a handle that gives only TEXT (a served model at `--access text`, `narrow(h, "text")`)
there are no probabilities to compare: efficacy and paraphrase are then the fraction of prompts
whose greedy continuation begins with the new object as a whole word, neighbourhood the fraction
whose continuation begins with the true object (`answers`), the exact-match reading of the same
questions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lfm.access import Access, ScoresModel
from lfm.assets.labelled import json_lines
from lfm.edit.requests import Request
from lfm.errors import LfmError


@dataclass(frozen=True)
class Fact:
    id: int
    relation: str
    subject: str
    prompt: str
    true: str
    new: str
    paraphrases: tuple[str, ...]
    neighbourhood: tuple[str, ...]
    generation: tuple[str, ...] = field(default=())
    split: str = ""  # "train" or "test" where the set is split (the lifelong set), else ""

    @property
    def request(self) -> Request:
        """The counterfactual edit: `prompt` → `new`."""
        return Request(self.prompt, self.subject, self.new)


PACKAGED = ("facts", "lifelong")  # the fact sets shipped in `lfm/edit/data/<name>.jsonl`


def load_facts(
    path: str | Path | None = None, *, name: str = "facts", split: str | None = None
) -> list[Fact]:
    """A packaged fact set by name (`PACKAGED`), or a JSON-lines file of the same shape.

    Args:
        path: a file to read instead of a packaged set.
        name: the packaged set: "facts" (316 facts) or "lifelong" (1,496, split).
        split: keep only the facts of this split ("train" or "test").
    """
    if path:
        text = Path(path).read_text()
    elif name in PACKAGED:
        text = resources.files("lfm.edit").joinpath(f"data/{name}.jsonl").read_text()
    else:
        raise LfmError(f"no packaged fact set {name!r}; choose from {', '.join(PACKAGED)}")
    facts = [_fact(json.loads(line)) for line in text.splitlines() if line.strip()]
    if split is None:
        return facts
    kept = [f for f in facts if f.split == split]
    if not kept:
        raise LfmError(f"no facts of split {split!r} in {path or name}")
    return kept


def _fact(r: dict[str, Any]) -> Fact:
    seqs = {k: tuple(r.get(k, ())) for k in ("paraphrases", "neighbourhood", "generation")}
    return Fact(int(r["id"]), r["relation"], r["subject"], r["prompt"], r["true"], r["new"], **seqs,
                split=str(r.get("split", "")))  # fmt: skip


def known_facts(handle: Any, facts: Sequence[Fact]) -> list[Fact]:
    """The facts whose true object's first token is the model's top-1 next token."""
    with torch.no_grad():
        logp = handle.next_token_logprobs([f.prompt for f in facts])
        keep = []
        for f, row in zip(facts, logp, strict=True):
            first = _first_token(handle, f.prompt, f.true)
            if int(row.argmax()) == first:
                keep.append(f)
        return keep


def _first_token(handle: Any, prompt: str, obj: str) -> int:
    from lfm.edit.requests import target_ids

    return target_ids(handle.tokenizer, prompt, obj)[0]


def _wins(handle: ScoresModel, prompts: Sequence[str], a: str, b: str) -> float:
    """Fraction of prompts where log P(a) > log P(b) (whole objects, with a leading space)."""
    if not prompts:
        return float("nan")
    n = len(prompts)
    s = handle.score(list(prompts) * 2, [f" {a}"] * n + [f" {b}"] * n)
    return float((s[:n] > s[n:]).float().mean())


ANSWER_TOKENS = 8  # greedy tokens read for a TEXT handle's answer (objects take 1–4 here)


def answers(handle: Any, prompts: Sequence[str], obj: str, tokens: int = ANSWER_TOKENS) -> float:
    """Fraction of prompts whose greedy continuation begins with `obj` as a whole word (leading
    space ignored): what a TEXT handle can tell of a fact, where `_wins` needs scores."""
    if not prompts:
        return float("nan")
    outs = handle.generate(list(prompts), max_new_tokens=tokens)
    return sum(begins_with(t, obj) for t in outs) / len(outs)


def begins_with(text: str, obj: str) -> bool:
    """Whether `text`, less its leading white space, starts with the word(s) `obj`: " Paris, the
    capital" does for "Paris", " Parisian" does not."""
    head = text.lstrip()
    return head.startswith(obj) and not head[len(obj) : len(obj) + 1].isalnum()


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency: weighted mean of n-gram entropies (bits) of the text's words."""
    words = text.split()
    parts = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def neighbours(fact: Fact, edited: Collection[str] = ()) -> tuple[str, ...]:
    """The fact's neighbourhood prompts, less those naming a subject edited alongside it.

    Every neighbourhood prompt here is another fact's subject with the same object; in a batch or
    a sequence of edits that subject may be edited too, and its prompt is then an edit, not a
    neighbour (counting it measured the batch's own edits as damage).
    """
    others = [s for s in edited if s != fact.subject]
    return tuple(p for p in fact.neighbourhood if not any(s in p for s in others))


def evaluate_fact(
    handle: Any, fact: Fact, gen_tokens: int = 0, edited: Collection[str] = ()
) -> dict[str, float]:
    """CounterFact metrics (fractions in [0, 1]) of one fact on the (edited) model of `handle`
    (through a TEXT handle, their exact-match reading: see the module's docstring).

    `edited`: subjects of all edits applied together (batch or sequence); neighbourhood prompts
    naming one of them are left out (NaN if none is left, skipped by `summarise`).
    """
    level = getattr(handle, "access", Access.WEIGHTS)  # a plain module or model: white-box
    scored = level >= Access.SCORES  # else a TEXT handle: its greedy answers, exact match

    def wins(prompts: Sequence[str], a: str, b: str) -> float:
        return _wins(handle, prompts, a, b) if scored else answers(handle, prompts, a)

    out = {
        "efficacy": wins([fact.prompt], fact.new, fact.true),
        "paraphrase": wins(fact.paraphrases, fact.new, fact.true),
        "neighbourhood": wins(neighbours(fact, edited), fact.true, fact.new),
    }
    if gen_tokens and fact.generation:
        texts = handle.generate(list(fact.generation), max_new_tokens=gen_tokens)
        out["generation"] = sum(fact.new in t for t in texts) / len(texts)
        out["fluency"] = sum(
            ngram_entropy(p + t) for p, t in zip(fact.generation, texts, strict=True)
        ) / len(texts)
    return out


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means in percent (fluency in bits), NaNs skipped, and the harmonic-mean Score of ES, PS,
    NS over those the facts allow (a set without paraphrase or neighbourhood prompts has that
    metric NaN or absent; 0 where one is 0; 0 with none)."""
    keys = rows[0].keys() if rows else ()
    kept = {k: [r[k] for r in rows if not math.isnan(r[k])] for k in keys}
    mean = {k: sum(v) / len(v) if v else float("nan") for k, v in kept.items()}
    out = {k: (v if k == "fluency" else 100 * v) for k, v in mean.items()}
    names = ("efficacy", "paraphrase", "neighbourhood")
    parts = [out[k] for k in names if k in out and not math.isnan(out[k])]
    out["score"] = 0.0 if not parts or min(parts) <= 0 else len(parts) / sum(1 / p for p in parts)
    return out


def read_facts(path: str | Path) -> list[Fact]:
    """Facts of one's own: a JSON-lines file, one edit per line.

    Each line has `prompt`, `subject` and `target` (the new object; the packaged `new` is read
    as it); optional: `true` (the object before the edit; empty: filled in by `fill_true`),
    `paraphrases` (prompts that should also give the target), `neighbourhood` (prompts of other
    subjects that should keep `true`), `generation`, `relation` and `id` (default: the line
    number). So the packaged file reads too. A bad line is a one-line `LfmError` naming it.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LfmError(f"cannot read facts from {path}: {e}") from None
    facts = [_own_fact(path, i, r) for i, r in json_lines(path, text)]
    if not facts:
        raise LfmError(f"{path} holds no facts (one JSON object per line)")
    return facts


def _own_fact(path: str | Path, i: int, row: dict) -> Fact:
    where = f"{path}, line {i}"
    r = {**row, "target": row.get("target", row.get("new"))}
    missing = [k for k in ("prompt", "subject", "target") if not r.get(k)]
    if missing:
        raise LfmError(f"{where}: no {', '.join(map(repr, missing))} (fields: {sorted(r)})")
    seqs = {}
    for k in ("paraphrases", "neighbourhood", "generation"):
        v = r.get(k, [])
        if not isinstance(v, list) or not all(isinstance(p, str) and p.strip() for p in v):
            raise LfmError(f"{where}: {k!r} must be a list of prompts")
        seqs[k] = tuple(v)
    try:
        req = Request(str(r["prompt"]), str(r["subject"]), str(r["target"]))
    except LfmError as e:
        raise LfmError(f"{where}: {e}") from None
    return Fact(int(r.get("id", i)), str(r.get("relation", "")), req.subject, req.prompt,
                str(r.get("true", "")).strip(), req.target, **seqs)  # fmt: skip


def fill_true(handle: Any, facts: Sequence[Fact], max_new_tokens: int = 4) -> list[Fact]:
    """Facts without a `true` object get the model's own answer: the first word of its greedy
    continuation of the prompt (on the model as it is: call it before an edit)."""
    todo = [f for f in facts if not f.true]
    if not todo:
        return list(facts)
    texts = handle.generate([f.prompt for f in todo], max_new_tokens=max_new_tokens)
    words = {
        f.id: (t.split() or ["?"])[0].strip(".,;:!?\"'") or "?"
        for f, t in zip(todo, texts, strict=True)
    }
    return [f if f.true else replace(f, true=words[f.id]) for f in facts]
