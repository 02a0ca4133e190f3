"""The data a pipeline step reads, from a small mapping in the pipeline file.

- images: `{dataset: digits, classes: [0, 1, 2], train: 500, test: 200}` — an offline image set
  (`lfm datasets`), optionally some of its classes (labels keep their numbers) and the first
  `train` / `test` examples of each split.
- text classification: `{dataset: bbc-news, shots: 4, eval_per_class: 8, max_chars: 300}` — k
  examples per class drawn by the seed for training, the first held-out ones of each class for
  evaluation; or a JSON-lines file, `{file: data.jsonl, text_field: text, label_field: label}`,
  whose every fifth line of a class is held out.
- text: `{dataset: bbc-news, texts: 40, max_chars: 400}` — plain texts (perplexity, LM students).

Each spec is checked by its schema before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lfm.errors import ConfigError, LfmError


class ImageData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "digits"  # an offline image data set (`lfm datasets`)
    classes: list[int] | None = None  # keep only these labels (None: all)
    train: int = Field(0, ge=0)  # first N training examples kept (0: all)
    test: int = Field(0, ge=0)  # first N test examples kept (0: all)
    batch_size: int = Field(64, ge=1)


class TextClassData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = "bbc-news"  # an offline text data set, or None with `file`
    file: str | None = None  # JSON lines with a text and a label per line
    text_field: str = "text"
    label_field: str = "label"
    shots: int = Field(4, ge=1)  # training examples per class
    eval_per_class: int = Field(8, ge=1)  # held-out examples per class for evaluation
    max_chars: int = Field(400, ge=1)  # texts are cut to this many characters
    seed: int = 0


class TextData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "bbc-news"
    split: str = "test"  # train or test
    texts: int = Field(40, ge=1)  # how many texts
    max_chars: int = Field(400, ge=1)


class FactsData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: list[int] = Field(min_length=1)  # ids of CounterFact-style facts (`lfm.edit.facts`)
    file: str | None = None  # a JSON-lines fact file of the same shape (default: the packaged)


class EpisodeData(BaseModel):
    """A family of few-shot tasks for meta learning (`lfm.meta.recipes.build_problem`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["sinusoid", "digits", "fashion-mnist"] = "digits"  # rotated N-way, or sine waves
    shots: int = Field(5, ge=1)  # K support examples (per class on images)
    ways: int = Field(5, ge=2)  # N classes per episode (images)
    test_tasks: int = Field(100, ge=1)  # held-out tasks at evaluation


KINDS: dict[str, type[BaseModel]] = {
    "images": ImageData, "classification": TextClassData, "text": TextData, "facts": FactsData,
    "episodes": EpisodeData,
}  # fmt: skip


def check(kind: str, data: dict[str, Any] | None, step: str) -> list[str]:
    """Problems of a data spec of `kind`, one line each (empty when it is valid)."""
    if data is None:
        return [f"step {step!r}: needs `data` ({kind})"]
    try:
        KINDS[kind].model_validate(data)
    except ValidationError as e:
        return [
            f"step {step!r}: data.{'.'.join(map(str, err['loc']))}: {err['msg']}"
            for err in e.errors()
        ]
    return []


def parse(kind: str, data: dict[str, Any] | None) -> Any:
    try:
        return KINDS[kind].model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(f"data: {e.errors()[0]['msg']}") from None


def images(spec: ImageData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one split of an image data set, restricted as the spec says."""
    from lfm.assets import ArrayDataset, load_dataset

    ds = load_dataset(spec.dataset)
    if not isinstance(ds, ArrayDataset):
        raise LfmError(f"{spec.dataset} is not an image or feature data set")
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    if spec.classes is not None:
        keep = torch.isin(y, torch.tensor(spec.classes))
        x, y = x[keep], y[keep]
    n = spec.train if split == "train" else spec.test
    return (x[:n], y[:n]) if n else (x, y)


def batches(
    x: torch.Tensor, y: torch.Tensor, size: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (once, by `seed`) mini-batches."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(y), size)]


def text_classes(
    spec: TextClassData,
) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor, tuple[str, ...]]:
    """(train texts, labels, eval texts, labels, class names): `shots` per class drawn by the
    seed (`lfm.tuning.tasks.few_shot`) and the first `eval_per_class` held-out ones (`held_out`)."""
    from lfm.assets import TextDataset, load_dataset
    from lfm.tuning.tasks import few_shot, held_out

    ds = (
        _read_jsonl(Path(spec.file), spec.text_field, spec.label_field)
        if spec.file
        else load_dataset(str(spec.dataset))
    )
    if not isinstance(ds, TextDataset):
        raise LfmError(f"{spec.dataset} is not a text data set")
    x, y = few_shot(ds, spec.shots, spec.seed)
    xe, ye = held_out(ds, spec.eval_per_class)
    cut = lambda texts: [t[: spec.max_chars].strip() for t in texts]  # noqa: E731
    return cut(x), y, cut(xe), ye, tuple(ds.classes)


def _read_jsonl(path: Path, text_field: str, label_field: str, holdout_every: int = 5) -> Any:
    """A JSON-lines file as a `TextDataset`: classes sorted by name, and (as for BBC News) the
    line at position i of its class held out when i % 5 == 4."""
    from lfm.assets import TextDataset

    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise LfmError(f"cannot read {path}: {e}") from None
    if not rows or any(
        not isinstance(r, dict) or text_field not in r or label_field not in r for r in rows
    ):
        raise LfmError(f"{path}: every line needs {text_field!r} and {label_field!r}")
    classes = tuple(sorted({str(r[label_field]) for r in rows}))
    seen = dict.fromkeys(classes, 0)
    parts: tuple[list, list] = ([], [])
    for r in rows:
        label = str(r[label_field])
        parts[seen[label] % holdout_every == holdout_every - 1].append(
            (str(r[text_field]), classes.index(label))
        )
        seen[label] += 1
    (tr, te) = parts
    return TextDataset(path.name, tuple(t for t, _ in tr), torch.tensor([c for _, c in tr], dtype=torch.long),
                       tuple(t for t, _ in te), torch.tensor([c for _, c in te], dtype=torch.long), classes)  # fmt: skip


def texts(spec: TextData) -> list[str]:
    from lfm.assets import TextDataset, load_dataset

    ds = load_dataset(spec.dataset)
    if not isinstance(ds, TextDataset):
        raise LfmError(f"{spec.dataset} is not a text data set")
    pool = ds.train_texts if spec.split == "train" else ds.test_texts
    return [t[: spec.max_chars].strip() for t in pool[: spec.texts]]


def facts(spec: FactsData) -> list[Any]:
    """The facts with the given ids, in that order (a one-line error for an unknown id)."""
    from lfm.edit.facts import load_facts

    table = {f.id: f for f in load_facts(spec.file)}
    missing = [i for i in spec.ids if i not in table]
    if missing:
        raise LfmError(f"no fact with id {missing[0]} (the fact set has {len(table)})")
    return [table[i] for i in spec.ids]
