"""Discrete prompt search through a SCORES API, after GrIPS (Prasad et al. 2022, arXiv 2203.07281).

A candidate prompt is an instruction (a list of phrases) and a choice of demonstrations. Each
iteration applies random edits to the current best,

    delete a phrase · swap two phrases · add a phrase from a pool · replace a phrase · swap a demo,

scores every candidate on the few-shot set through the API, and keeps the best if it beats the
current one (greedy; stop after `patience` iterations without gain). The score is

    S = accuracy + 0.1 · mean_i log softmax_c(s_ic)[y_i]

(accuracy with a log-likelihood tie-break; GrIPS uses balanced accuracy plus an entropy term).
GrIPS paraphrases phrases with PEGASUS; here replacement draws from a phrase pool, so no second
model is needed. Only `score` is called: SCORES access.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from lfm.access import Access, require
from lfm.config import Config
from lfm.registry import register
from lfm.serve.client import BudgetExceeded
from lfm.tuning.tasks import Verbalizer, class_scores

POOL = (
    "Read the news article.",
    "Answer with one word.",
    "Choose the topic of the article.",
    "The topic is business, entertainment, politics, sport or technology.",
    "Think about what the article is mainly about.",
    "Give the category of the text.",
)


class PromptSearchConfig(Config):
    instruction: str = "Classify the news article by its topic."  # the starting instruction
    n_demos: int = Field(1, ge=0)  # demonstrations in the prompt
    iterations: int = Field(10, ge=1)  # search steps (GrIPS: 10)
    candidates: int = Field(5, ge=1)  # edited candidates scored per step (GrIPS: 5)
    patience: int = Field(2, ge=1)  # steps without gain before stopping (GrIPS: 2)
    demo_chars: int = Field(200, ge=1)  # demonstrations are cut to this many characters


@dataclass(frozen=True)
class Candidate:
    phrases: tuple[str, ...]
    demos: tuple[int, ...]  # indices into the demonstration pool


@dataclass
class SearchResult:
    best: Candidate
    verbalizer: Verbalizer
    start_score: float
    best_score: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0  # candidates scored
    score_calls: int = 0  # `score` calls made on the handle
    stopped: str = "iterations"


def _escape(s: str) -> str:
    return s.replace("{", "{{").replace("}", "}}")


def render(
    c: Candidate, base: Verbalizer, pool: Sequence[tuple[str, int]], demo_chars: int
) -> Verbalizer:
    """The verbaliser of a candidate: instruction, demonstrations, then the base template."""
    demos = "".join(base.prompt(_escape(t[:demo_chars])).replace("{", "{{").replace("}", "}}")
                    + f" {base.label_words[y]}\n\n" for t, y in (pool[i] for i in c.demos))  # fmt: skip
    head = _escape(" ".join(c.phrases)) + "\n\n" if c.phrases else ""
    return Verbalizer(head + demos + base.template, base.label_words, base.max_chars)


def edit(c: Candidate, n_pool: int, rng: random.Random) -> Candidate:
    """One random GrIPS-style edit of the instruction or the demonstrations."""
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
        p[rng.randrange(len(p))] = rng.choice(POOL)
    else:
        p.insert(rng.randrange(len(p) + 1), rng.choice(POOL))
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


@register("tuning", "prompt-search", branch="input engineering", access=Access.SCORES,
          config=PromptSearchConfig, paper="Prasad et al. 2022, GrIPS, arXiv 2203.07281",
          smoke=lambda cfg, seed: _smoke(cfg, seed))  # fmt: skip
def prompt_search(handle: Any, texts: Sequence[str], y: torch.Tensor, verb: Verbalizer,
                  cfg: PromptSearchConfig = PromptSearchConfig(), seed: int = 0) -> SearchResult:  # fmt: skip
    """Greedy edit search over instruction phrases and demonstrations through a SCORES handle.

    Args:
        handle: gives `score` (local, narrowed or remote).
        texts, y: the few-shot train set; `n_demos` examples per class are set aside as the
            demonstration pool (none when `n_demos` is 0), the rest is scored.
        verb: the base template and label words.
        cfg: search settings. A client `Budget` running out stops the search with its best so far.
        seed: seeds the edits.
    """
    require(handle, Access.SCORES, "tuning/prompt-search")
    rng = random.Random(seed)
    pool, score_texts, score_y = _split(texts, y, cfg.n_demos)
    calls = [0]

    def evaluate(c: Candidate) -> float:
        calls[0] += 1
        v = render(c, verb, pool, cfg.demo_chars)
        return objective(class_scores(handle, score_texts, v), score_y)

    start = Candidate(
        tuple(s for s in cfg.instruction.split(". ") if s),
        tuple(range(min(cfg.n_demos, len(pool)))),
    )
    res = SearchResult(start, render(start, verb, pool, cfg.demo_chars), 0.0, 0.0)
    res.start_score = res.best_score = evaluate(start)
    _greedy(res, evaluate, cfg, rng, len(pool) if cfg.n_demos else 0)
    res.evaluations, res.score_calls = calls[0], calls[0]
    res.verbalizer = render(res.best, verb, pool, cfg.demo_chars)
    return res


def _greedy(
    res: SearchResult, evaluate: Any, cfg: PromptSearchConfig, rng: random.Random, n_pool: int
) -> None:
    idle = 0
    for _ in range(cfg.iterations):
        cands = [edit(res.best, n_pool, rng) for _ in range(cfg.candidates)]
        try:
            scored = [(evaluate(c), i) for i, c in enumerate(cands)]
        except BudgetExceeded:
            res.stopped = "api-budget"
            return
        top, i = max(scored)
        idle = 0 if top > res.best_score else idle + 1
        if top > res.best_score:
            res.best, res.best_score = cands[i], top
        res.history.append(res.best_score)
        if idle >= cfg.patience:
            res.stopped = "patience"
            return


def _smoke(cfg: PromptSearchConfig, seed: int) -> dict[str, float]:
    from lfm.access import narrow
    from lfm.tuning.blackbox_tiny import WORDS, tiny_lm, tiny_task

    texts, y = tiny_task()
    small = cfg.replace(iterations=3, candidates=2)
    res = prompt_search(
        narrow(tiny_lm(0), "scores"),
        texts,
        y,
        Verbalizer("Article: {text}\nTopic:", WORDS),
        small,
        seed,
    )
    return {"start": res.start_score, "best": res.best_score, "evaluations": float(res.evaluations)}
