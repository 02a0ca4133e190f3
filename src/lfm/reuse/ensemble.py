"""Output ensembles over model handles: they need only SCORES (averaging) or TEXT (voting) access,
so they run over narrowed and remote handles as well as local models.

- probability averaging (Dietterich 2000, "Ensemble methods in machine learning"; the survey's
  "ensemble" branch):  p(y|x) = Σ_m w_m p_m(y|x) / Σ_m w_m, returned as log-probabilities;
- weighted majority vote:  ŷ = argmax_y Σ_m w_m [ŷ_m = y]  (ties go to the smallest label, or
  to the answer seen first for text).

Both are registered functions of the `ENSEMBLE` shape, `(handles, inputs, cfg)`; what a member is
asked depends on what it is. Classifiers give `scores(x)` (log-probabilities) and `predict(x)`
(labels); language models give `next_token_logprobs(prompts)` and `generate(prompts)`.
`LabelWords(handle, words)` reads a language model as a classifier over label words (each word
scored after the prompt, normalised over the words), so both ensembles classify texts with LMs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from lfm.access import Access, ClassScoresModel, LabelModel, ScoresModel, TextModel, require
from lfm.config import Config
from lfm.errors import LfmError
from lfm.registry import Example, register
from lfm.reuse.contract import ENSEMBLE
from lfm.reuse.examples import batch, classifiers


class EnsembleConfig(Config):
    weights: tuple[float, ...] | None = None  # one weight per member (None: equal)
    space: Literal["prob", "logprob"] = "prob"  # average probabilities or log-probabilities


class VoteConfig(Config):
    weights: tuple[float, ...] | None = None  # one vote weight per member (None: one each)
    max_new_tokens: int = Field(32, ge=1)  # length of each answer, when the members are LMs


def mixture_weights(n: int, weights: Sequence[float] | None) -> Tensor:
    """One weight per member (None: equal), checked and normalised to sum to 1."""
    w = torch.ones(n) if weights is None else torch.tensor([float(v) for v in weights])
    if len(w) != n:
        raise LfmError(f"{len(w)} weights for {n} ensemble members")
    # mixture weights: a NaN, a negative weight or a zero sum gives no distribution
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise LfmError(
            f"ensemble weights must be finite, non-negative and not all zero: {w.tolist()}"
        )
    return w / w.sum()


def average_logprobs(members: Sequence[Tensor], cfg: EnsembleConfig | None = None) -> Tensor:
    """Weighted average of log-probability tensors (B, C) in probability or log space."""
    cfg = cfg or EnsembleConfig()
    w = mixture_weights(len(members), cfg.weights)
    stacked = torch.stack([m.float() for m in members])  # (M, B, C)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    if cfg.space == "logprob":
        return (w.view(shape) * stacked).sum(0).log_softmax(-1)
    return torch.logsumexp(stacked + w.log().view(shape), dim=0)


def vote_labels(labels: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted majority vote over label tensors (B,); ties go to the smallest label."""
    stacked = torch.stack([lab.long() for lab in labels])  # (M, B)
    w = mixture_weights(len(labels), weights)
    n_cls = int(stacked.max()) + 1
    tally = torch.zeros(stacked.shape[1], n_cls)
    for m in range(len(labels)):
        tally[torch.arange(stacked.shape[1]), stacked[m]] += w[m]
    return tally.argmax(-1)  # argmax returns the first maximum: the smallest label


def vote_texts(
    answers: Sequence[Sequence[str]], weights: Sequence[float] | None = None
) -> list[str]:
    """Weighted majority vote over answers (members × prompts), compared after stripping."""
    w = mixture_weights(len(answers), weights).tolist()
    out = []
    for i in range(len(answers[0])):
        tally: Counter[str] = Counter()
        for m, ans in enumerate(answers):
            tally[ans[i].strip()] += w[m]
        out.append(max(tally, key=lambda a: tally[a]))  # max keeps the first of equals
    return out


def label_word_logprobs(handle: Any, prompts: Sequence[str], words: Sequence[str]) -> Tensor:
    """log p(label | prompt) (B, L) of one LM, normalised over the label words."""
    flat_p = [p for p in prompts for _ in words]
    scores = handle.score(flat_p, list(words) * len(prompts)).view(len(prompts), len(words))
    return scores.log_softmax(-1)


class LabelWords:
    """A language model read as a classifier over label words: SCORES access.

    `scores(prompts)` gives log p(word | prompt) normalised over the words (B, L) and
    `predict(prompts)` the index of the likeliest word. The last prompts' scores are kept, so a
    caller that asks an ensemble and then each member for its labels scores the texts once.

    Args:
        handle: an LM handle with SCORES access or more (`score(prompts, continuations)`).
        words: the label words (index = label), usually with a leading space.
    """

    access: ClassVar[Access] = Access.SCORES

    def __init__(self, handle: Any, words: Sequence[str]):
        require(handle, Access.SCORES, "label-word classification")
        self.handle, self.words, self.name = handle, list(words), getattr(handle, "name", "lm")
        self._last: tuple[tuple[str, ...], Tensor] | None = None

    def __repr__(self) -> str:
        return f"LabelWords({self.name!r}, {len(self.words)} words)"

    def scores(self, prompts: Sequence[str]) -> Tensor:
        key = tuple(prompts)
        if self._last is None or self._last[0] != key:
            self._last = (key, label_word_logprobs(self.handle, prompts, self.words))
        return self._last[1]

    def predict(self, prompts: Sequence[str]) -> Tensor:
        return self.scores(prompts).argmax(-1)


def _classifiers(handles: Sequence[Any], method: str) -> bool:
    """True when every member is a classifier (`scores`/`predict`), False when every one is an LM."""
    kinds = {hasattr(h, "scores") or hasattr(h, "predict") for h in handles}
    if len(kinds) != 1:
        raise LfmError(f"{method}: the members mix classifiers and language models")
    return kinds.pop()


def _example(level: Access, seed: int) -> Example:
    _, handles = classifiers(level, [seed, seed + 1, seed + 2])
    return Example((handles, batch(seed)))


@register(
    "reuse", "ensemble_average", shape=ENSEMBLE, branch="ensemble", access=Access.SCORES,
    config=EnsembleConfig, paper="Dietterich 2000, MCS (doi 10.1007/3-540-45014-9_1)",
    example=_example, cli="lfm reuse ensemble MODELS... --method ensemble_average",
)  # fmt: skip
def ensemble_average(
    handles: Sequence[ScoresModel | ClassScoresModel], inputs: Any, cfg: Any = None
) -> Tensor:
    """Averaged log-probabilities of the members on `inputs`.

    Args:
        handles: classifiers (`scores(x)`: (B, C)), `LabelWords` over LMs, or LMs with one
            vocabulary (`next_token_logprobs(prompts)`: (B, V)); SCORES access or more.
        inputs: what each member is asked: inputs `x`, or prompts.
        cfg: an `EnsembleConfig` (member weights; probability or log-probability space).
    """
    if _classifiers(handles, "reuse/ensemble_average"):
        return average_logprobs([h.scores(inputs) for h in handles], cfg)
    return average_logprobs([h.next_token_logprobs(inputs) for h in handles], cfg)


@register(
    "reuse", "ensemble_vote", shape=ENSEMBLE, branch="ensemble", access=Access.TEXT,
    config=VoteConfig, paper="Dietterich 2000, MCS (doi 10.1007/3-540-45014-9_1)",
    example=_example, cli="lfm reuse ensemble MODELS... --method ensemble_vote",
)  # fmt: skip
def ensemble_vote(
    handles: Sequence[TextModel | LabelModel], inputs: Any, cfg: Any = None
) -> Tensor | list[str]:
    """Weighted majority vote of the members' answers on `inputs`.

    Args:
        handles: classifiers or `LabelWords` (`predict`: labels (B,)), or LMs (`generate`:
            answers, compared after stripping); TEXT access or more.
        inputs: what each member is asked: inputs `x`, or prompts.
        cfg: a `VoteConfig` (vote weights; answer length for LMs).

    Returns:
        Labels (B,) for classifiers (ties: the smallest label), answers for LMs (ties: the
        answer seen first).
    """
    if _classifiers(handles, "reuse/ensemble_vote"):
        return vote_labels([h.predict(inputs) for h in handles], cfg.weights)
    answers = [h.generate(inputs, max_new_tokens=cfg.max_new_tokens) for h in handles]
    return vote_texts(answers, cfg.weights)
