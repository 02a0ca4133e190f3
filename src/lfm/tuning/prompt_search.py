"""Discrete prompt search through a SCORES API, after GrIPS (Prasad et al. 2022, arXiv 2203.07281).

A candidate prompt is an instruction (a list of phrases) and a choice of demonstrations. Each
iteration applies random edits to the current best,

    delete a phrase · swap two phrases · add a phrase from the pool · replace a phrase · swap a demo,

scores every candidate on the few-shot set through the API, and keeps the best if it beats the
current one (greedy; stop after `patience` iterations without gain). The score is

    S = accuracy + 0.1 · mean_i log softmax_c(s_ic)[y_i]

(accuracy with a log-likelihood tie-break; GrIPS uses balanced accuracy plus an entropy term).
GrIPS paraphrases phrases with PEGASUS; here additions and replacements draw from a phrase pool
built from the task itself (`phrase_pool`): phrases that name its label words ("Answer with one
of: ..."), short generic instructions that name no data set, and, when a proposer model is given,
instructions it writes from a few demonstrations (APE's meta-prompt, `lfm.tuning.proposer`).
Only `score` is called on the target: SCORES access.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from lfm.access import Access, ScoresModel, require
from lfm.config import Config
from lfm.core.io import write_json
from lfm.errors import BudgetExceeded, LfmError
from lfm.registry import register
from lfm.tuning.contract import TUNER
from lfm.tuning.proposer import ape_proposals, key
from lfm.tuning.replay import ReplayLog, json_hash
from lfm.tuning.results import TuneResult
from lfm.tuning.tasks import TextClassification, Verbalizer, class_scores
from lfm.tuning.tiny import example
from lfm.tuning.trainer import data_kind

GENERIC = (  # instruction phrases that fit any classification task and name no data set
    "Read the text.",
    "Answer with one word.",
    "Think about what the text is mainly about.",
    "Give the category of the text.",
    "Choose the label that fits best.",
)
PROPOSER_DEMOS, PROPOSAL_TOKENS, PROPOSAL_CHARS = 5, 32, 150  # what a proposer sees and writes


class PromptSearchConfig(Config):
    instruction: str = "Classify the text."  # the starting instruction
    n_demos: int = Field(1, ge=0)  # demonstrations in the prompt
    iterations: int = Field(10, ge=1)  # search steps (GrIPS: 10)
    candidates: int = Field(5, ge=1)  # edited candidates scored per step (GrIPS: 5)
    patience: int = Field(2, ge=1)  # steps without gain before stopping (GrIPS: 2)
    demo_chars: int = Field(200, ge=1)  # demonstrations are cut to this many characters
    proposals: int = Field(4, ge=0)  # pool phrases a proposer writes, when one is given
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # the proposer's sampling (0: greedy)


@dataclass(frozen=True)
class Candidate:
    phrases: tuple[str, ...]
    demos: tuple[int, ...]  # indices into the demonstration pool


TEMPLATE_FILE = "template.json"


@dataclass(kw_only=True)
class SearchResult(TuneResult):
    """The best prompt found: its candidate (phrases, demonstrations) and the template it renders.

    `history` holds the best score after each iteration.
    """

    best: Candidate
    verbalizer: Verbalizer  # the best candidate's template and the label words
    start_score: float
    best_score: float
    evaluations: int = 0  # candidates scored (a resumed search's include the replayed ones)
    score_calls: int = 0  # candidates scored through the handle (a resumed search: this attempt)
    stopped: str = "iterations"
    pool: tuple[str, ...] = ()  # the phrases the edits drew from

    def scores(self, handle: Any, texts: Sequence[str]) -> torch.Tensor:
        """Label-word log-probabilities (N, C) of `texts` under the found template (SCORES)."""
        return class_scores(handle, texts, self.verbalizer)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "start_score": self.start_score, "best_score": self.best_score,
                "evaluations": self.evaluations, "stopped": self.stopped,
                "phrases": list(self.best.phrases), "demos": list(self.best.demos),
                "template": self.verbalizer.template, "verbalizer": self.verbalizer.to_dict(),
                "pool": list(self.pool)}  # fmt: skip

    def _save_parts(self, folder: Path) -> None:
        write_json(folder / TEMPLATE_FILE, self.verbalizer.to_dict())


def load_template(folder: str | Path) -> Verbalizer:
    """The verbaliser (template and label words) saved by `SearchResult.save`."""
    path = Path(folder) / TEMPLATE_FILE
    try:
        d = json.loads(path.read_text())
        return Verbalizer.from_dict(d)
    except (OSError, ValueError, KeyError) as e:
        raise LfmError(f"cannot read a prompt template from {path}: {e}") from None


def _escape(s: str) -> str:
    return s.replace("{", "{{").replace("}", "}}")


def render(
    c: Candidate, base: Verbalizer, pool: Sequence[tuple[str, int]], demo_chars: int
) -> Verbalizer:
    """The verbaliser of a candidate: instruction, demonstrations, then the base template."""
    demos = "".join(base.prompt(t[:demo_chars]).replace("{", "{{").replace("}", "}}")
                    + f" {base.label_words[y]}\n\n" for t, y in (pool[i] for i in c.demos))  # fmt: skip
    head = _escape(" ".join(c.phrases)) + "\n\n" if c.phrases else ""
    return Verbalizer(head + demos + base.template, base.label_words, base.max_chars)


def label_phrases(words: Sequence[str]) -> tuple[str, ...]:
    """Phrases that name the task's label words (what the model must answer with)."""
    listed = f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]
    return (f"Answer with one of: {', '.join(words)}.", f"The answer is {listed}.")


def phrase_pool(verb: Verbalizer, proposed: Sequence[str] = ()) -> tuple[str, ...]:
    """The phrases edits add and replace: those naming the label words, the generic ones, then
    the proposed ones (in this order, once each: the pool is a function of the task and seed)."""
    pool: dict[str, str] = {}
    for p in (*label_phrases(verb.label_words), *GENERIC, *proposed):
        pool.setdefault(key(p), p)
    return tuple(pool.values())


def proposed_phrases(
    proposer: Any, data: TextClassification, cfg: PromptSearchConfig, seed: int
) -> list[str]:
    """`cfg.proposals` instructions a proposer writes from demonstrations of the task (APE's
    meta-prompt), the unusable ones left out."""
    if proposer is None or cfg.proposals == 0:
        return []
    verb = data.needs_verbalizer("prompt search")
    found, _ = ape_proposals(proposer, data.texts, data.labels, verb.label_words,
                             n=cfg.proposals, demos=PROPOSER_DEMOS, chars=cfg.demo_chars,
                             tokens=PROPOSAL_TOKENS, temperature=cfg.temperature,
                             max_chars=PROPOSAL_CHARS, seed=seed)  # fmt: skip
    return [p for p in found if p is not None]


def edit(c: Candidate, n_pool: int, rng: random.Random, phrases: Sequence[str]) -> Candidate:
    """One random GrIPS-style edit of the instruction or the demonstrations; added and replacing
    phrases come from `phrases`."""
    ops = (
        ["add", "replace", "demo"]
        + (["delete"] if c.phrases else [])
        + (["swap"] if len(c.phrases) > 1 else [])
    )
    op, p = rng.choice(ops), list(c.phrases)
    if op == "demo" and c.demos and n_pool > len(c.demos):
        d = list(c.demos)
        d[rng.randrange(len(d))] = rng.choice([i for i in range(n_pool) if i not in d])
        return Candidate(c.phrases, tuple(d))
    if op == "delete":
        p.pop(rng.randrange(len(p)))
    elif op == "swap":
        i, j = rng.sample(range(len(p)), 2)
        p[i], p[j] = p[j], p[i]
    elif op == "replace" and p:
        p[rng.randrange(len(p))] = rng.choice(phrases)
    else:
        p.insert(rng.randrange(len(p) + 1), rng.choice(phrases))
    return Candidate(tuple(p), c.demos)


def objective(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy plus 0.1 × the mean log-probability of the gold label among the labels."""
    acc = float((scores.argmax(-1) == y).float().mean())
    return acc + 0.1 * float(scores.log_softmax(-1)[torch.arange(len(y)), y].mean())


def _split(
    texts: Sequence[str], y: torch.Tensor, n_demos: int
) -> tuple[list, list[str], torch.Tensor]:
    """The first `n_demos` examples of each class become the demonstration pool (never scored)."""
    if n_demos == 0:
        return [], list(texts), y
    pool_idx = {
        i for c in y.unique().tolist() for i in (y == c).nonzero().flatten()[:n_demos].tolist()
    }
    pool = [(texts[i], int(y[i])) for i in sorted(pool_idx)]
    rest = [i for i in range(len(texts)) if i not in pool_idx]
    return pool, [texts[i] for i in rest], y[rest]


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example_summary(res: SearchResult) -> dict[str, Any]:
    return {"start": res.start_score, "best": res.best_score, "evaluations": res.evaluations,
            "template": res.verbalizer.template}  # fmt: skip


# pragma: no mutate end


def prompt_search(
    handle: ScoresModel,
    data: TextClassification,
    cfg: PromptSearchConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    log: ReplayLog | None = None,
    proposer: Any = None,
) -> SearchResult:
    """Greedy edit search over instruction phrases and demonstrations through a SCORES handle.

    Args:
        handle: gives `score` (local, narrowed or remote).
        data: the few-shot train set with its base verbaliser (template and label words);
            `n_demos` examples per class are set aside as the demonstration pool (none when
            `n_demos` is 0), the rest is scored.
        cfg: search settings. A client `Budget` running out stops the search with its best so far.
        seed: seeds the edits (and the proposer's sampling).
        progress: print one line per search step (stderr): the best score and the calls so far.
        log: log every scored candidate into a run directory (once per step), and replay those
            it already holds instead of calling the model: a resumed search ends as an
            uninterrupted one.
        proposer: a model with `generate` (any access level) that adds `cfg.proposals` phrases
            of its own to the pool, written from demonstrations of the task; None: the pool
            holds the label-word and generic phrases only.
    """
    data_kind(data, "prompt_search", {TextClassification: "a TextClassification"})
    verb, texts, y = data.needs_verbalizer("prompt search"), data.texts, data.labels
    if proposer is not None:
        require(proposer, Access.TEXT, "the proposer")
    phrases = phrase_pool(verb, proposed_phrases(proposer, data, cfg, seed))
    rng = random.Random(seed)
    pool, score_texts, score_y = _split(texts, y, cfg.n_demos)
    calls = [0]

    def score(c: Candidate) -> float:
        v = render(c, verb, pool, cfg.demo_chars)
        return objective(class_scores(handle, score_texts, v), score_y)

    log = log or ReplayLog()
    scored = log.wrap(score, lambda c: json_hash([c.phrases, c.demos]))

    def evaluate(c: Candidate) -> float:
        calls[0] += 1
        return scored(c)

    start = Candidate(
        tuple(s for s in re.split(r"(?<=[.!?]) +", cfg.instruction) if s),  # sentences, stops kept
        tuple(range(min(cfg.n_demos, len(pool)))),
    )
    first = evaluate(start)
    res = SearchResult(method="prompt_search", config=cfg, best=start,
                       verbalizer=render(start, verb, pool, cfg.demo_chars),
                       start_score=first, best_score=first, pool=phrases)  # fmt: skip
    say = _step_line(cfg, calls) if progress else None
    try:
        n_pool = len(pool) if cfg.n_demos else 0
        _greedy(res, evaluate, cfg, rng, n_pool, phrases, say, log.flush)
    finally:
        log.flush()
    res.evaluations, res.score_calls = calls[0], log.calls
    res.verbalizer = render(res.best, verb, pool, cfg.demo_chars)
    return res


prompt_search = register(
    "tuning", "prompt_search", shape=TUNER, branch="input engineering", access=Access.SCORES,
    config=PromptSearchConfig, paper="Prasad et al. 2022, GrIPS, arXiv 2203.07281",
    example=example(PromptSearchConfig(iterations=3, candidates=2), steps=None,
                    summary=_example_summary),
    cli="lfm tuning prompt-search",
)(prompt_search)  # fmt: skip


def _step_line(cfg: PromptSearchConfig, calls: list[int]) -> Any:
    """`say(step, res)`: one progress line on stderr after a search step."""

    def say(step: int, res: SearchResult) -> None:
        print(f"[lfm] prompt search step {step}/{cfg.iterations}: best score "
              f"{res.best_score:.4f} (start {res.start_score:.4f}), {calls[0]} prompts scored",
              file=sys.stderr, flush=True)  # fmt: skip

    return say


def _greedy(
    res: SearchResult, evaluate: Any, cfg: PromptSearchConfig, rng: random.Random, n_pool: int,
    phrases: Sequence[str], say: Any = None, flush: Any = None,
) -> None:  # fmt: skip
    idle = 0
    for step in range(1, cfg.iterations + 1):
        cands = [edit(res.best, n_pool, rng, phrases) for _ in range(cfg.candidates)]
        try:
            scored = [(evaluate(c), i) for i, c in enumerate(cands)]
        except BudgetExceeded:
            res.stopped = "api-budget"
            return
        if flush is not None:
            flush()  # one write per step: a killed run loses at most this one
        top, i = max(scored)
        idle = 0 if top > res.best_score else idle + 1
        if top > res.best_score:
            res.best, res.best_score = cands[i], top
        res.history.append(res.best_score)
        if say is not None:
            say(step, res)
        if idle >= cfg.patience:
            res.stopped = "patience"
            return
