"""Few-shot tasks from your own image folders (`lfm meta train --data DIR`).

A task folder holds one folder of images per class (the ImageFolder layout, read by
`lfm.assets.images.read_image_folder`), in one of two layouts:

    chars/                          chars/
        alpha/  01.png 02.png ...       train/  alpha/ ...  beta/ ...
        beta/   ...                     test/   gamma/ ...
        ...                             val/    ...        (optional, not read)

In the first, the classes are shuffled under the seed and a share of them (`test_classes`: a
fraction, or a count) is held out as the meta-test classes; in the second, `train/` and `test/`
give the meta-train and meta-test classes. N-way K-shot episodes are then drawn from each side by
`EpisodeTasks`, as for the bundled rotated-digit tasks (Vinyals et al. 2016, arXiv 1606.04080).
Too few classes for N ways, a class with fewer than K + Q images, or a folder that cannot be read
is one `LfmError` line, raised before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lfm.assets.images import class_folders, image_files, read_image_folder
from lfm.errors import LfmError
from lfm.meta.tasks import EpisodeTasks, split_classes

QUERIES = 5  # query images per class in an episode (as the bundled image tasks)
SPLITS = ("train", "test")  # the sub-folders of the split layout (`val/` may sit beside them)


@dataclass
class FolderTasks:
    """Meta-train and meta-test episodes over the classes of a task folder."""

    train: EpisodeTasks
    test: EpisodeTasks
    channels: int  # 1 (greyscale) or 3 (colour)
    split: dict[str, list[str]]  # class names of each side: {"train": [...], "test": [...]}


def _n_test(n: int, test_classes: float) -> int:
    """Held-out classes out of `n`: a fraction in (0, 1) of them (at least 1), or a count."""
    if test_classes >= 1 and test_classes != int(test_classes):
        raise LfmError(f"--test-classes {test_classes}: give a fraction in (0, 1) or a count")
    k = int(test_classes) if test_classes >= 1 else max(1, round(n * test_classes))
    if test_classes <= 0 or k >= n:
        raise LfmError(
            f"--test-classes {test_classes} leaves no class on one side of {n} classes; give a "
            "fraction in (0, 1) or a count below the number of classes"
        )
    return k


def _sides(root: Path, test_classes: float, seed: int) -> dict[str, list[Path]]:
    """The class folders of each side: from `train/` and `test/`, or split under `seed`."""
    folders = class_folders(root)
    names = {f.name for f in folders}
    if names & set(SPLITS):
        missing = [s for s in SPLITS if s not in names]
        if missing:
            raise LfmError(
                f"{root} has {'/'.join(sorted(names & set(SPLITS)))}/ but no {missing[0]}/: give "
                f"both train/ and test/ (each holding class folders), or one folder per class"
            )
        return {s: class_folders(root / s) for s in SPLITS}
    k = _n_test(len(folders), test_classes)
    train, _, test = split_classes(list(range(len(folders))), (len(folders) - k, 0, k), seed)
    return {"train": [folders[i] for i in train], "test": [folders[i] for i in test]}


def _check(root: Path, sides: dict[str, list[Path]], ways: int, shots: int, queries: int) -> None:
    """One-line errors for too few classes on a side, or too few images in a class."""
    for side, folders in sides.items():
        if len(folders) < ways:
            layout = folders[0].parent != root  # train/ and test/ given
            more = f"add class folders to {root / side}" if layout else "change --test-classes"
            raise LfmError(
                f"{root} has {len(folders)} meta-{side} classes; {ways}-way episodes need at "
                f"least {ways}: lower --ways or {more}"
            )
    need = shots + queries
    for side, folders in sides.items():
        for f in folders:
            n = len(image_files(f))
            if n < need:
                raise LfmError(
                    f"class {f.name!r} (meta-{side}) has {n} images; {shots}-shot episodes with "
                    f"{queries} queries need {need} per class: lower --shots or add images"
                )


def _read(sides: dict[str, list[Path]], size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every image of both sides, labelled by class in the order of `sides`, in one channel
    count: colour when any image is colour."""
    roots = list(dict.fromkeys(f.parent for fs in sides.values() for f in fs))
    parts = [read_image_folder(r, size) for r in roots]
    channels = max(x.shape[1] for x, _, _ in parts)
    if any(x.shape[1] != channels for x, _, _ in parts):  # grey train/, colour test/: all RGB
        parts = [read_image_folder(r, size, channels) for r in roots]
    pools = {(r, name): x[y == i] for r, (x, y, names) in zip(roots, parts, strict=True)
             for i, name in enumerate(names)}  # fmt: skip
    ordered = [pools[f.parent, f.name] for fs in sides.values() for f in fs]
    labels = torch.cat([torch.full((len(p),), i) for i, p in enumerate(ordered)])
    return torch.cat(ordered), labels, channels


def folder_tasks(
    root: str | Path,
    *,
    ways: int,
    shots: int,
    queries: int = QUERIES,
    size: int = 28,
    test_classes: float = 0.2,
    seed: int = 0,
) -> FolderTasks:
    """Meta-train and meta-test episode samplers over the classes of a task folder.

    Args:
        root: the task folder (`root/<class>/<images>`, or `root/train/...` and `root/test/...`).
        ways: N classes per episode.
        shots: K support images per class.
        queries: query images per class.
        size: images are resized to size × size.
        test_classes: without `train/`/`test/`: the share of classes held out for meta-test, a
            fraction in (0, 1) or a count.
        seed: seeds the class split.
    """
    root = Path(root)
    sides = _sides(root, test_classes, seed)
    _check(root, sides, ways, shots, queries)
    x, y, channels = _read(sides, size)
    n_train = len(sides["train"])
    episode = {"ways": ways, "shots": shots, "queries": queries}
    return FolderTasks(
        EpisodeTasks(x, y, range(n_train), **episode),
        EpisodeTasks(x, y, range(n_train, n_train + len(sides["test"])), **episode),
        channels,
        {side: [f.name for f in fs] for side, fs in sides.items()},
    )
