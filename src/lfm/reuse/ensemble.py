"""Output ensembles over model handles: they need only SCORES (averaging) or TEXT (voting) access,
so they run over narrowed and remote handles as well as local models.

- probability averaging (Dietterich 2000, "Ensemble methods in machine learning"; the survey's
  "ensemble" branch):  p(y|x) = Σ_m w_m p_m(y|x) / Σ_m w_m, returned as log-probabilities;
- weighted majority vote:  ŷ = argmax_y Σ_m w_m [ŷ_m = y]  (ties go to the smallest label, or
  to the answer seen first for text).

Classifiers give `scores(x)` (log-probabilities) and `predict(x)` (labels); language models give
`next_token_logprobs(prompts)` and `score(prompts, continuations)` (label-word classification),
and `generate(prompts)` for voting over answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lfm.access import Access, LocalClassifier, narrow, require
from lfm.config import Config
from lfm.registry import register


class EnsembleConfig(Config):
    weights: tuple[float, ...] | None = None  # one weight per member (None: equal)
    space: Literal["prob", "logprob"] = "prob"  # average probabilities or log-probabilities


class VoteConfig(Config):
    weights: tuple[float, ...] | None = None  # one vote weight per member (None: one each)


def _weights(n: int, weights: Sequence[float] | None) -> Tensor:
    w = torch.ones(n) if weights is None else torch.tensor([float(v) for v in weights])
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} ensemble members")
    return w / w.sum()


def average_logprobs(members: Sequence[Tensor], cfg: EnsembleConfig | None = None) -> Tensor:
    """Weighted average of log-probability tensors (B, C) in probability or log space."""
    cfg = cfg or EnsembleConfig()
    w = _weights(len(members), cfg.weights)
    stacked = torch.stack([m.float() for m in members])  # (M, B, C)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    if cfg.space == "logprob":
        return (w.view(shape) * stacked).sum(0).log_softmax(-1)
    return torch.logsumexp(stacked + w.log().view(shape), dim=0)


def vote_labels(labels: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted majority vote over label tensors (B,); ties go to the smallest label."""
    stacked = torch.stack([lab.long() for lab in labels])  # (M, B)
    w = _weights(len(labels), weights)
    n_cls = int(stacked.max()) + 1
    tally = torch.zeros(stacked.shape[1], n_cls)
    for m in range(len(labels)):
        tally[torch.arange(stacked.shape[1]), stacked[m]] += w[m]
    return tally.argmax(-1)  # argmax returns the first maximum: the smallest label


def vote_texts(
    answers: Sequence[Sequence[str]], weights: Sequence[float] | None = None
) -> list[str]:
    """Weighted majority vote over answers (members × prompts), compared after stripping."""
    w = _weights(len(answers), weights).tolist()
    out = []
    for i in range(len(answers[0])):
        tally: Counter[str] = Counter()
        for m, ans in enumerate(answers):
            tally[ans[i].strip()] += w[m]
        out.append(max(tally, key=lambda a: tally[a]))  # max keeps the first of equals
    return out


def _check(handles: Sequence[Any], level: Access, what: str) -> None:
    for h in handles:
        require(h, level, what)


@register(
    "reuse", "ensemble_average", branch="ensemble", access=Access.SCORES, config=EnsembleConfig,
    paper="Dietterich 2000, MCS (doi 10.1007/3-540-45014-9_1)",
    smoke=lambda cfg, seed: _smoke_average(cfg, seed),
)  # fmt: skip
def ensemble_scores(handles: Sequence[Any], x: Tensor, cfg: EnsembleConfig | None = None) -> Tensor:
    """Averaged log-probabilities (B, C) of classifier handles (SCORES access or more)."""
    _check(handles, Access.SCORES, "reuse/ensemble_average")
    return average_logprobs([h.scores(x) for h in handles], cfg)


def ensemble_next_token(
    handles: Sequence[Any], prompts: Sequence[str], cfg: EnsembleConfig | None = None
) -> Tensor:
    """Averaged next-token log-probabilities (B, V) of LM handles with one vocabulary."""
    _check(handles, Access.SCORES, "reuse/ensemble_average")
    return average_logprobs([h.next_token_logprobs(prompts) for h in handles], cfg)


def label_word_logprobs(handle: Any, prompts: Sequence[str], words: Sequence[str]) -> Tensor:
    """log p(label | prompt) (B, L) of one LM, normalised over the label words."""
    flat_p = [p for p in prompts for _ in words]
    scores = handle.score(flat_p, list(words) * len(prompts)).view(len(prompts), len(words))
    return scores.log_softmax(-1)


def ensemble_label_words(
    handles: Sequence[Any],
    prompts: Sequence[str],
    words: Sequence[str],
    cfg: EnsembleConfig | None = None,
) -> Tensor:
    """Averaged label-word log-probabilities (B, L): classification by continuation scores."""
    _check(handles, Access.SCORES, "reuse/ensemble_average")
    return average_logprobs([label_word_logprobs(h, prompts, words) for h in handles], cfg)


def classify_label_words(
    handles: Sequence[Any],
    prompts: Sequence[str],
    words: Sequence[str],
    mode: Literal["average", "vote"] = "average",
    weights: Sequence[float] | None = None,
    space: Literal["prob", "logprob"] = "prob",
) -> tuple[Tensor, list[Tensor]]:
    """Ensemble labels (B,) by averaged label-word probabilities or a vote, and each member's labels.

    Args:
        handles: LM handles with SCORES access (each member scores every label word).
        prompts: one prompt per example, ending where the label word comes next.
        words: the label words (index = label).
        mode: "average" (probability averaging) or "vote" (weighted majority of members' argmax).
        weights: one weight per member (None: equal).
        space: with "average", average probabilities or log-probabilities.
    """
    _check(handles, Access.SCORES, "reuse/ensemble_average")
    per = [label_word_logprobs(h, prompts, words) for h in handles]  # M x (B, L)
    members = [p.argmax(-1) for p in per]
    if mode == "vote":
        return vote_labels(members, weights), members
    cfg = EnsembleConfig(weights=tuple(weights) if weights else None, space=space)
    return average_logprobs(per, cfg).argmax(-1), members


@register(
    "reuse", "ensemble_vote", branch="ensemble", access=Access.TEXT, config=VoteConfig,
    paper="Dietterich 2000, MCS (doi 10.1007/3-540-45014-9_1)",
    smoke=lambda cfg, seed: _smoke_vote(cfg, seed),
)  # fmt: skip
def ensemble_predict(handles: Sequence[Any], x: Tensor, cfg: VoteConfig | None = None) -> Tensor:
    """Weighted majority vote of classifier handles' labels (TEXT access or more)."""
    _check(handles, Access.TEXT, "reuse/ensemble_vote")
    return vote_labels([h.predict(x) for h in handles], (cfg or VoteConfig()).weights)


def ensemble_generate(
    handles: Sequence[Any], prompts: Sequence[str], cfg: VoteConfig | None = None, **gen: Any
) -> list[str]:
    """Weighted majority vote over the answers LM handles generate (TEXT access or more)."""
    _check(handles, Access.TEXT, "reuse/ensemble_vote")
    answers = [h.generate(prompts, **gen) for h in handles]
    return vote_texts(answers, (cfg or VoteConfig()).weights)


def _smoke_members(seed: int, level: Access) -> tuple[list[Any], Tensor]:
    torch.manual_seed(seed)
    models = [nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    return [narrow(LocalClassifier(m), level) for m in models], x


def _smoke_average(cfg: Config, seed: int) -> dict[str, Tensor]:
    handles, x = _smoke_members(seed, Access.SCORES)
    return {"logprobs": ensemble_scores(handles, x, cfg)}  # type: ignore[arg-type]


def _smoke_vote(cfg: Config, seed: int) -> dict[str, Tensor]:
    handles, x = _smoke_members(seed, Access.TEXT)
    return {"labels": ensemble_predict(handles, x, cfg)}  # type: ignore[arg-type]
