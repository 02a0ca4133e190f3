"""The data a tuner learns from, and prompt-based classification.

A tuner is `(handle, data, cfg) -> TuneResult`; `data` is one of these small typed tasks:

- `TextClassification(texts, labels, verbalizer=... | n_classes=...)`: a causal LM classifies
  through label words (the `Verbalizer`), an encoder through a new head over `n_classes`;
- `Instructions(rows)`: prompt/response pairs for supervised fine-tuning;
- `Corpus(texts)`: the texts of a kNN-LM datastore;
- `Documents(texts)`: the documents REPLUG retrieves from.

Prompt-based classification (as in LM-BFF, Gao et al. 2021, arXiv 2012.15723, and BBT) scores each
class's label word as the continuation of a template and predicts the best:

    ŷ = argmax_c  log p(" " + word_c | template(x))

It needs only SCORES access, so it runs the same on a white-box, narrowed or remote handle.

A classification file of one's own (JSON lines or CSV) is read by
`lfm.assets.labelled.read_labelled` and split into training and held-out examples, per class and
in file order, by `labelled_dataset`; its label strings are the label words
(`labelled_verbalizer`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lfm.access import Access, ScoresModel, require
from lfm.assets.datasets import TextDataset
from lfm.errors import ConfigError

BBC_LABEL_WORDS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "technology",
}
BBC_TEMPLATE = "Article: {text}\nTopic:"


class TooFewExamples(ConfigError, ValueError):
    """A class has fewer training examples than the few-shot draw asks for."""


@dataclass(frozen=True)
class Verbalizer:
    """A template with one `{text}` slot and one label word per class (scored with a leading space)."""

    template: str
    label_words: tuple[str, ...]
    max_chars: int = 1200  # articles are cut to keep prompts short; the cut is part of the protocol

    def prompt(self, text: str) -> str:
        return self.template.format(text=text[: self.max_chars].strip())

    def to_dict(self) -> dict[str, object]:
        return {"template": self.template, "label_words": list(self.label_words),
                "max_chars": self.max_chars}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verbalizer:
        """The verbaliser `to_dict` wrote (a missing key is a `KeyError` for the reader to word)."""
        return cls(str(d["template"]), tuple(d["label_words"]), int(d["max_chars"]))


def bbc_verbalizer(classes: Sequence[str], max_chars: int = 1200) -> Verbalizer:
    return Verbalizer(BBC_TEMPLATE, tuple(BBC_LABEL_WORDS[c] for c in classes), max_chars)


@dataclass(frozen=True)
class TextClassification:
    """Texts with integer labels: the task of the classification tuners.

    Args:
        texts: the inputs (raw: a verbaliser's template is applied where it is used).
        labels: (N,) class indices.
        verbalizer: template and label words; a causal LM (and every black-box method) classifies
            through it.
        n_classes: the number of classes of an encoder's new head, when there is no verbaliser.
        max_tokens: prompts are cut to this many tokens when batched for training.
    """

    texts: tuple[str, ...]
    labels: torch.Tensor
    verbalizer: Verbalizer | None = None
    n_classes: int | None = None
    max_tokens: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", torch.as_tensor(self.labels, dtype=torch.long))
        if len(self.texts) != len(self.labels):
            raise ConfigError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.verbalizer is None and self.n_classes is None:
            raise ConfigError("a TextClassification needs a verbalizer (label words) or n_classes")
        if (
            len(self.labels)
            and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.classes
        ):
            raise ConfigError(f"labels must lie in range({self.classes})")

    @property
    def classes(self) -> int:
        """How many classes (the verbaliser's label words, else `n_classes`)."""
        return len(self.verbalizer.label_words) if self.verbalizer else int(self.n_classes or 0)

    def prompts(self) -> list[str]:
        """The texts through the verbaliser's template (as they are without one)."""
        v = self.verbalizer
        return [v.prompt(t) for t in self.texts] if v else list(self.texts)

    def needs_verbalizer(self, what: str) -> Verbalizer:
        """The verbaliser, or a `ConfigError` saying that `what` needs one."""
        if self.verbalizer is None:
            raise ConfigError(f"{what} classifies through label words; give the task a verbalizer")
        return self.verbalizer


@dataclass(frozen=True)
class Instructions:
    """Prompt/response pairs: the task of supervised fine-tuning (loss on the responses)."""

    rows: tuple[Mapping[str, str], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(dict(r) for r in self.rows))
        bad = [i for i, r in enumerate(self.rows) if not {"prompt", "response"} <= set(r)]
        if bad:
            raise ConfigError(f"instruction rows {bad[:5]} lack a 'prompt' or 'response' field")
        if not self.rows:
            raise ConfigError("no instruction rows")


@dataclass(frozen=True)
class Corpus:
    """Texts whose every position goes into a kNN-LM datastore."""

    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if not self.texts:
            raise ConfigError("an empty corpus gives an empty datastore")


@dataclass(frozen=True)
class Documents:
    """The documents REPLUG retrieves from (each cut to `ReplugConfig.doc_chars` when used)."""

    texts: tuple[str, ...]
    embeddings: torch.Tensor | None = field(default=None, compare=False)  # precomputed (N, E)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if not self.texts:
            raise ConfigError("REPLUG needs at least one document")


def class_scores(handle: ScoresModel, texts: Sequence[str], verb: Verbalizer) -> torch.Tensor:
    """Log-probabilities (N, C) of each label word after each prompt (SCORES access).

    When every label word is one token, one forward pass per prompt gives all C scores;
    otherwise, or when the handle sends only its top-k log-probabilities per token (a served
    model's `top_k`), each (prompt, word) pair is scored on its own.
    """
    require(handle, Access.SCORES, "prompt-based classification")
    prompts = [verb.prompt(t) for t in texts]
    n, c = len(prompts), len(verb.label_words)
    ids = [handle.encode(f" {w}") for w in verb.label_words]  # type: ignore[attr-defined]
    if all(len(i) == 1 for i in ids) and getattr(handle, "top_k", None) is None:
        logp = handle.next_token_logprobs(prompts)  # type: ignore[attr-defined]
        return logp[:, [i[0] for i in ids]]
    flat_p = [p for p in prompts for _ in range(c)]
    flat_w = [f" {w}" for _ in prompts for w in verb.label_words]
    return handle.score(flat_p, flat_w).view(n, c)  # type: ignore[attr-defined]


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())


def few_shot(data: TextDataset, k: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """k training examples per class, drawn with `seed` (the test split is never touched)."""
    g = torch.Generator().manual_seed(seed)
    idx: list[int] = []
    for c in range(len(data.classes)):
        pool = (data.y_train == c).nonzero().flatten()
        if len(pool) < k:
            raise TooFewExamples(
                f"class {data.classes[c]!r} has only {len(pool)} training examples, fewer than k={k}"
            )
        idx += pool[torch.randperm(len(pool), generator=g)[:k]].tolist()
    return [data.train_texts[i] for i in idx], data.y_train[idx]


def held_out(data: TextDataset, per_class: int) -> tuple[list[str], torch.Tensor]:
    """The first `per_class` test articles of each class (a fixed subset; all for 0)."""
    if per_class <= 0:
        return list(data.test_texts), data.y_test
    idx = [
        i
        for c in range(len(data.classes))
        for i in (data.y_test == c).nonzero().flatten()[:per_class].tolist()
    ]
    return [data.test_texts[i] for i in idx], data.y_test[idx]


# ------------------------------------------------------------------------------------------------
# A classification file of one's own: JSON lines or CSV, one example per line.

DATA_TEMPLATE = "Text: {text}\nLabel:"  # a causal LM's template for a file's examples


def labelled_dataset(
    name: str, texts: Sequence[str], labels: Sequence[str], holdout: float, shots: int = 1
) -> TextDataset:
    """A train/held-out split of labelled texts, classes sorted by name.

    `holdout` is a fraction in (0, 1) of each class held out, spread evenly over the class's
    examples in file order (0.2: its 5th, 10th, ... example), or an integer k >= 2: every k-th
    example of each class. Deterministic: the same file gives the same split. Every class needs
    `shots` training examples and one held-out example.
    """
    frac = _holdout_fraction(holdout)
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise ConfigError(f"{name}: {len(classes)} class ({', '.join(classes)}); need at least 2")
    seen = dict.fromkeys(classes, 0)
    parts: tuple[list, list] = ([], [])
    for t, label in zip(texts, labels, strict=True):
        i = seen[label]
        held = math.floor((i + 1) * frac + 1e-9) > math.floor(i * frac + 1e-9)
        parts[held].append((t, classes.index(label)))
        seen[label] += 1
    _check_counts(name, classes, parts, shots, holdout)
    (tr, te) = parts
    return TextDataset(name, tuple(t for t, _ in tr), torch.tensor([c for _, c in tr]),
                       tuple(t for t, _ in te), torch.tensor([c for _, c in te]), classes)  # fmt: skip


def _holdout_fraction(holdout: float) -> float:
    if 0 < holdout < 1:
        return float(holdout)
    if holdout >= 2 and float(holdout).is_integer():
        return 1 / holdout
    raise ConfigError(f"holdout must be a fraction in (0, 1) or an integer k >= 2, not {holdout}")


def _check_counts(
    name: str, classes: Sequence[str], parts: tuple[list, list], shots: int, holdout: float
) -> None:
    """Every class has `shots` training examples and one held-out one, else a one-line error."""
    for c, label in enumerate(classes):
        train, held = (sum(y == c for _, y in part) for part in parts)
        if train < shots or held < 1:
            raise TooFewExamples(
                f"{name}: class {label!r} has {train + held} examples; it needs {shots} to train "
                f"on (--shots) and 1 held out (--holdout {holdout:g})"
            )


def labelled_verbalizer(classes: Sequence[str], max_chars: int = 1200) -> Verbalizer:
    """The label strings as label words, under `DATA_TEMPLATE`."""
    return Verbalizer(DATA_TEMPLATE, tuple(classes), max_chars)
