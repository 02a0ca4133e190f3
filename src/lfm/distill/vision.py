"""A small vision distillation recipe: a CNN teacher on Fashion-MNIST, a smaller CNN student.

Used by `bench/distill.py` and `lfm distill vision`. The student is trained with the same budget
(steps, batch size, learning rate) for every method; each method adds its losses to cross-entropy
on the labels: KD (Hinton et al. 2015, arXiv 1503.02531), FitNets hints at `block3`
(arXiv 1412.6550), RKD on the pooled embedding (arXiv 1904.05068), DIST (arXiv 2205.10536).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfm.access import LocalClassifier
from lfm.core.train import TrainConfig, shuffled_batches, train
from lfm.distill.datafree import deep_inversion_distill
from lfm.distill.distiller import distill
from lfm.runs import Run

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# name -> (losses for `distill`, weight of cross-entropy on the labels)
METHODS: dict[str, list[tuple]] = {
    "student": [],
    "kd": [("kd", 1.0, {"temperature": 4.0})],
    "fitnets": [("fitnets", 1.0, None, "block3", "block3")],
    "rkd": [("rkd", 1.0, None, "pool", "pool")],
    "dist": [("dist", 1.0, None)],
}


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor  # (N, 1, 28, 28) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) long
    x_test: torch.Tensor
    y_test: torch.Tensor


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist() -> Data:
    """Fashion-MNIST through `lfm.assets` when it exists, else from the Debian package's files."""
    try:
        from lfm.assets import load_dataset  # type: ignore[attr-defined]

        d = load_dataset("fashion-mnist")
        return Data(d.x_train, d.y_train, d.x_test, d.y_test)
    except (ImportError, AttributeError):
        pass

    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(_idx(FASHION_DIR / name).copy()).float().div(255).unsqueeze(1)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(_idx(FASHION_DIR / name).astype(np.int64))

    return Data(
        images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"),
    )  # fmt: skip


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class CNN(nn.Module):
    """Three conv blocks (28→14→7→7), global average pooling (`pool`) and a linear head."""

    def __init__(self, widths: tuple[int, int, int], n_classes: int = 10):
        super().__init__()
        self.block1 = _block(1, widths[0], pool=True)
        self.block2 = _block(widths[0], widths[1], pool=True)
        self.block3 = _block(widths[1], widths[2], pool=False)  # (B, C, 7, 7): the hint layer
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, C) embedding
        self.head = nn.Linear(widths[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block3(self.block2(self.block1(x)))))


def teacher_cnn() -> CNN:
    return CNN((16, 32, 32))


def student_cnn() -> CNN:
    return CNN((8, 16, 16))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    hits = sum(
        int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return hits / len(x)


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def train_teacher(data: Data, cfg: TrainConfig, batch_size: int, run: Run | None = None) -> CNN:
    """Train the teacher CNN with cross-entropy."""
    torch.manual_seed(cfg.seed)
    model = teacher_cnn()
    batches = shuffled_batches(data.x_train, data.y_train, batch_size=batch_size, seed=cfg.seed)
    train(model, _ce, batches, cfg, run)
    return model.eval()


def train_student(
    method: str,
    teacher: nn.Module,
    data: Data,
    cfg: TrainConfig,
    batch_size: int,
    run: Run | None = None,
) -> CNN:
    """Train a fresh student with `method` (a key of `METHODS`) under the budget in `cfg`."""
    torch.manual_seed(cfg.seed)
    student = student_cnn()
    batches = shuffled_batches(data.x_train, data.y_train, batch_size=batch_size, seed=cfg.seed)
    if METHODS[method]:
        distill(
            LocalClassifier(teacher, "teacher"), student, batches, METHODS[method], cfg, 1.0, run
        )
    else:
        train(student, _ce, batches, cfg, run)
    return student.eval()


def subsample(data: Data, n_train: int, n_test: int, seed: int = 0) -> Data:
    """A class-mixed random subset of the train and test sets."""
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(data.x_train), generator=g)[:n_train]
    te = torch.randperm(len(data.x_test), generator=g)[:n_test]
    return Data(data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te])


DATAFREE = ("deepinversion", "dafl", "dfad", "dfme")
# Fashion-MNIST settings over each method's paper defaults (docs/distill.md says why): a generator
# of width 16 for 28×28 grey images, and a BatchNorm-statistics weight β_f fit for this teacher.
DATAFREE_RECIPE: dict[str, dict[str, Any]] = {
    "deepinversion": {"bn_weight": 10.0, "steps": 200},
    "dafl": {"generator_width": 16},
    "dfad": {"generator_width": 16},
    "dfme": {"generator_width": 16},
}


def train_datafree(
    method: str,
    teacher: nn.Module,
    iterations: int,
    batch_size: int,
    seed: int = 0,
    kd_steps: int = 1000,
    **overrides: Any,
) -> tuple[CNN, int]:
    """A fresh student trained without data; returns it and the teacher's forward passes.

    Each method gets a handle narrowed to its registered access level: DeepInversion, DAFL and
    DFAD see the teacher's weights (gradients flow through it), DFME only its log-probabilities.
    The games alternate one generator update (`iterations` of them) with the method's student
    updates (DAFL: 1, DFAD and DFME: 5). DeepInversion synthesises `iterations` batches, then
    trains the student for `kd_steps` KD steps on them. `overrides` change the method's config
    over `DATAFREE_RECIPE`.
    """
    from lfm.access import narrow
    from lfm.registry import get

    spec = get(f"distill/{'deep_inversion' if method == 'deepinversion' else method}")
    torch.manual_seed(seed)
    student = student_cnn()
    handle = narrow(LocalClassifier(teacher, "teacher"), spec.access)  # the least it needs
    cfg = spec.config.build(DATAFREE_RECIPE[method], batch_size=batch_size, **overrides)
    if method != "deepinversion":
        res = spec.fn(handle, student, cfg.replace(iterations=iterations), seed=seed)
        return res.student, res.queries
    train_cfg = TrainConfig(steps=kd_steps, lr=3e-3, seed=seed, progress=False)
    deep_inversion_distill(handle, student, (1, 28, 28), 10, iterations, cfg, train_cfg, seed=seed)
    rounds = iterations if cfg.competition_weight > 0 else 1  # KD steps are split over rounds
    return student.eval(), batch_size * (
        iterations * cfg.steps + max(1, kd_steps // rounds) * rounds
    )
