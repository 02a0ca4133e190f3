"""A small vision distillation setting: a CNN teacher on Fashion-MNIST, a smaller CNN student.

Used by `lfm.distill.recipes` (`lfm distill vision`, `lfm distill datafree`) and the benchmarks;
`load_image_folder` gives the same setting on the user's images (the CNNs are built for their
classes and channels).
The student is trained with the same budget (steps, batch size, learning rate) for every method;
each method adds its loss to cross-entropy on the labels: logit losses (KD, arXiv 1503.02531;
reverse KL; top-k KD from the teacher's 5 most likely of 10 classes; DIST, arXiv 2205.10536) on
the logits, FitNets hints (arXiv 1412.6550) and attention transfer (arXiv 1612.03928) at
`block3`, RKD (arXiv 1904.05068) and PKT (arXiv 1803.10837) on the pooled embedding `pool`.
The data-free methods (`train_datafree`) never see an image: only the teacher was trained on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfm import registry
from lfm.access import Access, LocalClassifier, narrow
from lfm.assets import load_dataset
from lfm.assets.images import read_image_folder
from lfm.core.checkpoints import Checkpoints
from lfm.core.train import History, TrainConfig, shuffled_batches, train
from lfm.distill.contract import DistillResult, InputSpec
from lfm.distill.distiller import distill
from lfm.errors import ConfigError, LfmError
from lfm.runs import Run

# name -> the losses for `distill` (each student also gets cross-entropy on the labels, weight 1);
# "student" is the reference trained on the labels alone.
METHODS: dict[str, list[tuple]] = {
    "student": [],
    "kd": [("kd", 1.0, {"temperature": 4.0})],
    "reverse_kl": [("reverse_kl", 1.0, None)],
    "topk_kd": [("topk_kd", 1.0, {"k": 5})],
    "dist": [("dist", 1.0, None)],
    "fitnets": [("fitnets", 1.0, None, "block3", "block3")],
    "at": [("at", 1.0, None, "block3", "block3")],
    "rkd": [("rkd", 1.0, None, "pool", "pool")],
    "pkt": [("pkt", 1.0, None, "pool", "pool")],
}


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor  # (N, C, S, S) float32 in [0, 1]; Fashion-MNIST: (N, 1, 28, 28)
    y_train: torch.Tensor  # (N,) long
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = 10  # the models' output size (labels are 0 … n_classes − 1)

    @property
    def spec(self) -> InputSpec:
        """The shape of one image and the classes: what a data-free student is told."""
        return InputSpec(tuple(self.x_train.shape[1:]), self.n_classes)


def load_fashion_mnist() -> Data:
    """Fashion-MNIST (`lfm.assets`: the Debian package dataset-fashion-mnist)."""
    d = load_dataset("fashion-mnist")
    return Data(d.x_train, d.y_train, d.x_test, d.y_test)


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class CNN(nn.Module):
    """Three conv blocks (28→14→7→7 for 28×28 images; any size ≥ 4), global average pooling
    (`pool`) and a linear head."""

    def __init__(self, widths: tuple[int, int, int], n_classes: int = 10, channels: int = 1):
        super().__init__()
        self.block1 = _block(channels, widths[0], pool=True)
        self.block2 = _block(widths[0], widths[1], pool=True)
        self.block3 = _block(widths[1], widths[2], pool=False)  # (B, C, 7, 7): the hint layer
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, C) embedding
        self.head = nn.Linear(widths[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block3(self.block2(self.block1(x)))))


def teacher_cnn(n_classes: int = 10, channels: int = 1) -> CNN:
    return CNN((16, 32, 32), n_classes, channels)


def student_cnn(n_classes: int = 10, channels: int = 1) -> CNN:
    return CNN((8, 16, 16), n_classes, channels)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    device = next(model.parameters()).device  # the test set stays on the CPU, a batch moves
    hits = sum(
        int((model(x[i : i + batch].to(device)).argmax(-1).cpu() == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return hits / len(x)


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _batches(data: Data, batch_size: int, seed: int) -> Any:
    """Shuffled training batches; a batch is at most the whole training set (a larger one would
    never be drawn)."""
    size = min(batch_size, len(data.x_train))
    return shuffled_batches(data.x_train, data.y_train, batch_size=size, seed=seed)


def _shape(data: Data) -> dict[str, int]:
    return {"n_classes": data.n_classes, "channels": int(data.x_train.shape[1])}


def fit_teacher(
    data: Data, cfg: TrainConfig, batch_size: int, run: Run | None = None
) -> tuple[CNN, History]:
    """Train the teacher CNN (built for the data's classes and channels) with cross-entropy;
    returns it and the loop's `History` (a resumed run's earlier losses included)."""
    torch.manual_seed(cfg.seed)
    model = teacher_cnn(**_shape(data))
    hist = train(model, _ce, _batches(data, batch_size, cfg.seed), cfg, run)
    return model.eval(), hist


def train_teacher(data: Data, cfg: TrainConfig, batch_size: int, run: Run | None = None) -> CNN:
    """Train the teacher CNN with cross-entropy (`fit_teacher` without the history)."""
    return fit_teacher(data, cfg, batch_size, run)[0]


def fit_student(
    method: str,
    teacher: nn.Module,
    data: Data,
    cfg: TrainConfig,
    batch_size: int,
    run: Run | None = None,
) -> tuple[CNN, History]:
    """Train a fresh student with `method` (see `terms`) under the budget in `cfg`; returns it
    and the loop's `History`."""
    losses = terms(method)
    torch.manual_seed(cfg.seed)
    student = student_cnn(**_shape(data))
    batches = _batches(data, batch_size, cfg.seed)
    if losses:
        hist = distill(LocalClassifier(teacher, "teacher"), student, batches, losses, cfg, 1.0, run)
    else:
        hist = train(student, _ce, batches, cfg, run)
    return student.eval(), hist


def train_student(
    method: str,
    teacher: nn.Module,
    data: Data,
    cfg: TrainConfig,
    batch_size: int,
    run: Run | None = None,
) -> CNN:
    """Train a fresh student with `method` (`fit_student` without the history)."""
    return fit_student(method, teacher, data, cfg, batch_size, run)[0]


def terms(method: str) -> list[tuple]:
    """The loss terms of a vision method: its row of `METHODS` (settings fit for this CNN), or
    any other registered logit loss (SCORES) at its paper defaults; `student` trains alone."""
    if method in METHODS:
        return METHODS[method]
    from lfm.registry import get

    try:
        spec = get(method, area="distill")
    except LfmError:
        spec = None
    if spec is None or spec.shape.name != "loss" or spec.access > Access.SCORES:
        raise LfmError(f"unknown method {method!r}; choose one of {', '.join(vision_methods())}")
    return [(spec.name, 1.0, None)]


def vision_methods() -> list[str]:
    """Every method `terms` accepts: `METHODS` and the other registered logit losses."""
    from lfm.registry import methods

    logit = [
        s.name for s in methods("distill") if s.shape.name == "loss" and s.access <= Access.SCORES
    ]
    return [*METHODS, *(n for n in logit if n not in METHODS)]


def _known(method: str, table: dict[str, Any]) -> None:
    if method not in table:
        raise LfmError(f"unknown method {method!r}; choose one of {', '.join(table)}")


def subsample(data: Data, n_train: int, n_test: int, seed: int = 0) -> Data:
    """A class-mixed random subset of the train and test sets."""
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(data.x_train), generator=g)[:n_train]
    te = torch.randperm(len(data.x_test), generator=g)[:n_test]
    return Data(
        data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te], data.n_classes
    )


def holdout_split(
    y: torch.Tensor, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of indices: `round(fraction · n)` of each class's n examples are
    held out, at least one and never all (a class of one example stays in training).

    Returns:
        (train indices, held-out indices), each sorted.
    """
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values


def load_image_folder(
    root: str | Path, size: int = 28, holdout: float = 0.2, seed: int = 0
) -> tuple[Data, list[str], dict[str, Any]]:
    """Your images (`lfm.assets.images.read_image_folder` layout) as training and test sets.

    `root/train/<class>/` and `root/test/<class>/` are used as they are (the same class names in
    both; the test images are read with the training images' channels); otherwise
    `root/<class>/` is split by `holdout_split(labels, holdout, seed)`.

    Returns:
        the data, the class names (label i is `classes[i]`) and how it was split
        (`{"layout": "train/test" | "holdout", "train": n, "test": n[, "holdout", "seed"]}`).
    """
    root = Path(root)
    if not 0 < holdout < 1:
        raise ConfigError(f"the held-out fraction must be between 0 and 1, got {holdout}")
    parts = [(root / p).is_dir() for p in ("train", "test")]
    if any(parts) and not all(parts):
        have, lack = ("train", "test") if parts[0] else ("test", "train")
        raise ConfigError(f"{root} has a {have}/ folder but no {lack}/: give both, or class "
                          "folders only (a share of each class is then held out)")  # fmt: skip
    if all(parts):
        x, y, classes = read_image_folder(root / "train", size)
        x_te, y_te, test_classes = read_image_folder(root / "test", size, channels=x.shape[1])
        if test_classes != classes:
            raise ConfigError(f"{root}/train and {root}/test hold different classes "
                              f"({', '.join(classes)} against {', '.join(test_classes)})")  # fmt: skip
        data = Data(x, y, x_te, y_te, len(classes))
        return data, classes, {"layout": "train/test", "train": len(y), "test": len(y_te)}
    x, y, classes = read_image_folder(root, size)
    tr, te = holdout_split(y, holdout, seed)
    if len(te) == 0:
        raise ConfigError(f"{root}: every class has a single image, so none can be held out; "
                          "add images or give train/ and test/ folders")  # fmt: skip
    split = {
        "layout": "holdout",
        "holdout": holdout,
        "seed": seed,
        "train": len(tr),
        "test": len(te),
    }
    return Data(x[tr], y[tr], x[te], y[te], len(classes)), classes, split


DATAFREE = ("deep_inversion", "dafl", "dfad", "dfme")
# Fashion-MNIST settings over each method's paper defaults (docs/distill.md says why): a generator
# of width 16 for 28×28 grey images, and a BatchNorm-statistics weight β_f fit for this teacher.
DATAFREE_RECIPE: dict[str, dict[str, Any]] = {
    "deep_inversion": {"bn_weight": 10.0, "steps": 200},
    "dafl": {"generator_width": 16},
    "dfad": {"generator_width": 16},
    "dfme": {"generator_width": 16},
}
FASHION = InputSpec((1, 28, 28), 10)


def fit_datafree(
    method: str,
    teacher: nn.Module,
    iterations: int,
    batch_size: int,
    seed: int = 0,
    kd_steps: int = 1000,
    *,
    inputs: InputSpec = FASHION,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
    **overrides: Any,
) -> DistillResult:
    """A fresh student (built for `inputs`) trained without data: the method's `DistillResult`.

    Each method gets a handle narrowed to its registered access level: DeepInversion, DAFL and
    DFAD see the teacher's weights (gradients flow through it), DFME only its log-probabilities.
    The games alternate one generator update (`iterations` of them) with the method's student
    updates (DAFL: 1, DFAD and DFME: 5). DeepInversion synthesises `iterations` batches, then
    trains the student for `kd_steps` KD steps on them. `inputs` is the shape of one image and the
    teacher's classes (the generators make images of that shape); `progress` shows bars; `ckpt`
    checkpoints the method's loop into a run directory and goes on from a checkpoint there;
    `overrides` change the method's config over `DATAFREE_RECIPE`.
    """
    _known(method, DATAFREE_RECIPE)
    spec = registry.get(method, area="distill")
    torch.manual_seed(seed)
    student = student_cnn(inputs.n_classes, inputs.shape[0])
    student.to(next(teacher.parameters()).device)  # unchosen, the game runs where the teacher is
    handle = narrow(LocalClassifier(teacher, "teacher"), spec.access)  # the least it needs
    cfg = spec.config.build(DATAFREE_RECIPE[spec.name], batch_size=batch_size, **overrides)
    kw: dict[str, Any] = {"seed": seed, "progress": progress, "ckpt": ckpt}
    if spec.name == "deep_inversion":
        cfg = cfg.replace(batches=iterations)
        kw["train_cfg"] = TrainConfig(steps=kd_steps, lr=3e-3, seed=seed, progress=progress)
    else:
        cfg = cfg.replace(iterations=iterations)
    res = registry.run(spec.key, handle, student, inputs, cfg=cfg, **kw)
    res.student.eval()
    return res


def train_datafree(
    method: str,
    teacher: nn.Module,
    iterations: int,
    batch_size: int,
    seed: int = 0,
    kd_steps: int = 1000,
    **overrides: Any,
) -> tuple[CNN, int]:
    """`fit_datafree` on Fashion-MNIST's shape: the student and the teacher's forward passes."""
    res = fit_datafree(method, teacher, iterations, batch_size, seed, kd_steps, **overrides)
    return res.student, int(res.info["queries"])
