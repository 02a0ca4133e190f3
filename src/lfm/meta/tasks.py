"""Episode samplers: sinusoid regression and N-way K-shot classification.

Sinusoids follow MAML (Finn et al. 2017, arXiv 1703.03400, Sec. 5.1): y = A sin(x − φ) with
A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]. Classification episodes draw N classes from one split of
the classes, K support and Q query examples of each, relabelled 0..N−1 (Vinyals et al. 2016,
arXiv 1606.04080). New classes by rotating images by k·90° follow the Omniglot set-up of MAML
(after Santoro et al. 2016). Every draw takes an explicit `torch.Generator`, so a seed fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lfm.errors import LfmError
from lfm.meta.functional import Task


class Problem(NamedTuple):
    """What a sampler's tasks are scored by."""

    loss: Callable[[Tensor, Tensor], Tensor]  # training loss (prediction, target) -> scalar
    metric: Callable[[Tensor, Tensor], Tensor]  # per-task score reported at meta-test
    metric_name: str  # "mse" or "accuracy"
    n_out: int  # model outputs (1 for regression, N ways for classification)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean()


def regression() -> Problem:
    return Problem(F.mse_loss, F.mse_loss, "mse", 1)


def classification(ways: int) -> Problem:
    return Problem(F.cross_entropy, _accuracy, "accuracy", ways)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


class SinusoidTasks:
    """Sinusoid regression tasks of MAML Sec. 5.1.

    Args:
        shots: support points K per task.
        queries: query points per task.
        amplitude: range of A.
        phase: range of φ.
        x_range: range of the inputs.
    """

    def __init__(
        self,
        shots: int = 5,
        queries: int = 10,
        amplitude=(0.1, 5.0),
        phase=(0.0, math.pi),
        x_range=(-5.0, 5.0),
    ):
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.problem = regression()

    def sample(self, n: int, gen: torch.Generator) -> Task:
        """`n` tasks with support (n, K, 1) and query (n, Q, 1)."""
        a = _uniform(gen, (n, 1, 1), *self.amplitude)
        phi = _uniform(gen, (n, 1, 1), *self.phase)
        x = _uniform(gen, (n, self.shots + self.queries, 1), *self.x_range)
        y = a * torch.sin(x - phi)
        k = self.shots
        return Task(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


class EpisodeTasks:
    """N-way K-shot episodes over the given classes of a labelled array.

    Args:
        x: inputs (M, ...).
        y: integer labels (M,).
        classes: the classes episodes may use (one split: meta-train, -val or -test).
        ways: N classes per episode.
        shots: K support examples per class.
        queries: query examples per class.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        classes: Sequence[int],
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
    ):
        if len(classes) < ways:
            raise LfmError(f"{ways}-way episodes need at least {ways} classes, got {len(classes)}")
        self.pools = [x[y == c] for c in classes]
        small = [c for c, p in zip(classes, self.pools, strict=True) if len(p) < shots + queries]
        if small:
            raise LfmError(f"classes {small[:5]} have fewer than {shots + queries} examples")
        self.classes, self.ways, self.shots, self.queries = tuple(classes), ways, shots, queries
        self.problem = classification(ways)

    def episode(self, gen: torch.Generator) -> Task:
        """One episode, support (N·K, ...) and query (N·Q, ...), class-major order."""
        picks = torch.randperm(len(self.pools), generator=gen)[: self.ways].tolist()
        xs, xq = [], []
        for c in picks:
            pool = self.pools[c]
            idx = torch.randperm(len(pool), generator=gen)[: self.shots + self.queries]
            xs.append(pool[idx[: self.shots]])
            xq.append(pool[idx[self.shots :]])
        labels = torch.arange(self.ways)
        ys, yq = labels.repeat_interleave(self.shots), labels.repeat_interleave(self.queries)
        return Task(torch.cat(xs), ys, torch.cat(xq), yq)

    def sample(self, n: int, gen: torch.Generator) -> Task:
        """`n` episodes stacked on a leading task dimension."""
        eps = [self.episode(gen) for _ in range(n)]
        return Task(*(torch.stack(col) for col in zip(*eps, strict=True)))


def split_classes(
    classes: Sequence[int], sizes: tuple[int, int, int], seed: int = 0
) -> tuple[list[int], ...]:
    """Shuffle `classes` under `seed` and cut them into disjoint meta-train / -val / -test splits."""
    if sum(sizes) > len(classes):
        raise LfmError(f"splits {sizes} need {sum(sizes)} classes, only {len(classes)} given")
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [classes[i] for i in order]
    a, b, c = sizes
    return sorted(shuffled[:a]), sorted(shuffled[a : a + b]), sorted(shuffled[a + b : a + b + c])


def rotate(
    x: Tensor, y: Tensor, n_base: int, quarter_turns: Sequence[int] = (0, 1, 2, 3)
) -> tuple[Tensor, Tensor]:
    """Images rotated by k·90°; the rotation of class c by k becomes class c + k·n_base."""
    xs = [torch.rot90(x, k, dims=(-2, -1)) for k in quarter_turns]
    ys = [y + k * n_base for k in quarter_turns]
    return torch.cat(xs), torch.cat(ys)


def rotated_classes(
    classes: Sequence[int], n_base: int, quarter_turns: Sequence[int] = (0, 1, 2, 3)
) -> list[int]:
    """The labels `rotate` gives to the rotations of `classes` (split base classes first)."""
    return [c + k * n_base for k in quarter_turns for c in classes]


def load_images(name: str = "digits") -> tuple[Tensor, Tensor, int]:
    """All images (train and test) of a data set as (x (M,1,H,W) in [0, 1], y, n_classes)."""
    try:
        from lfm.assets import load_dataset

        ds = load_dataset(name)
        x, y = torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])
    except ImportError:
        if name != "digits":
            raise
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(bunch.target, dtype=torch.long)
    return x.float(), y.long(), int(y.max()) + 1


def first_per_class(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first `n` examples of every class (keeps 4 rotations of a large set in memory)."""
    keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in y.unique()])
    return x[keep], y[keep]


def rotated_digit_splits(
    name: str = "digits",
    sizes: tuple[int, int, int] = (6, 2, 2),
    seed: int = 0,
    per_class: int | None = None,
    **episode,
) -> tuple[EpisodeTasks, EpisodeTasks, EpisodeTasks]:
    """Meta-train/-val/-test samplers over rotated classes, base classes split before rotating.

    Args:
        name: `digits` (8×8) or `fashion-mnist` (28×28).
        sizes: base classes in the meta-train / -val / -test splits.
        seed: seeds the class split.
        per_class: keep only the first examples of each base class (None: all).
        **episode: `ways`, `shots`, `queries` of `EpisodeTasks`.
    """
    x, y, n = load_images(name)
    x, y = first_per_class(x, y, per_class) if per_class else (x, y)
    xr, yr = rotate(x, y, n)
    splits = split_classes(list(range(n)), sizes, seed)
    return tuple(EpisodeTasks(xr, yr, rotated_classes(s, n), **episode) for s in splits)  # type: ignore[return-value]
