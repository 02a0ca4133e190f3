"""Your own images, in the folder layout torchvision's `ImageFolder` uses: one folder per class.

    photos/
        cat/  001.png  002.jpg ...
        dog/  ...

`read_image_folder("photos", size=28)` gives the images as one float tensor (N, C, size, size) in
[0, 1], their labels (the index of the class folder in sorted order) and the class names. Every
problem with the folder (missing, no class folders, a class without images, an unreadable image)
is one `ConfigError` line naming the file, raised before anything trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lfm.errors import ConfigError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")


def class_folders(root: str | Path) -> list[Path]:
    """The class folders of `root` in sorted order (hidden folders left out); a one-line
    `ConfigError` when `root` is not a folder or holds none."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"{root} holds no class folders (expected {root}/<class>/<images>)")
    return folders


def image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted; a one-line `ConfigError` when there are none."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ConfigError(f"class folder {folder} holds no images ({', '.join(SUFFIXES)})")
    return files


def read_image(path: Path, size: int, channels: int) -> Tensor:
    """One image as (channels, size, size) floats in [0, 1] (grey for 1 channel, RGB for 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ConfigError(f"cannot read the image {path}: {e}") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)


def _channels(path: Path) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return 1 if img.mode in ("1", "L", "I", "I;16", "F", "LA") else 3
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"cannot read the image {path}: {e}") from None


def read_image_folder(
    root: str | Path, size: int = 28, channels: int | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Images (N, C, size, size) in [0, 1], labels (N,) and class names of an ImageFolder tree.

    `channels` None: 1 when every image is greyscale, else 3 (a grey image is then repeated in
    RGB). Images are resized to size x size (bilinear), not cropped."""
    if size < 1:
        raise ConfigError(f"image size must be >= 1, got {size}")
    folders = class_folders(root)
    files = [(i, f) for i, folder in enumerate(folders) for f in image_files(folder)]
    if channels is None:
        channels = 1 if all(_channels(f) == 1 for _, f in files) else 3
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    x = torch.stack([read_image(f, size, channels) for _, f in files])
    y = torch.tensor([i for i, _ in files], dtype=torch.long)
    return x, y, [f.name for f in folders]
