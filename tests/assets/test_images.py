"""Own image folders (`lfm.assets.images`): layout, labels, channels, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lfm.assets.images import read_image_folder
from lfm.errors import ConfigError


def _save(path, value, mode="L", size=(6, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


def test_classes_labels_values_and_size(tmp_path):
    _save(tmp_path / "b" / "1.png", 255)
    _save(tmp_path / "a" / "1.png", 0)
    _save(tmp_path / "a" / "sub" / "2.jpg", 0)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    x, y, classes = read_image_folder(tmp_path, size=5)
    assert classes == ["a", "b"]
    assert y.tolist() == [0, 0, 1]
    assert x.shape == (3, 1, 5, 5)
    assert x[0].max() == 0.0 and x[2].min() == 1.0  # resized, scaled to [0, 1]


def test_a_colour_image_makes_every_image_rgb(tmp_path):
    _save(tmp_path / "grey" / "1.png", 128)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    (tmp_path / "red").mkdir()
    Image.fromarray(red, "RGB").save(tmp_path / "red" / "1.png")
    x, _, _ = read_image_folder(tmp_path, size=4)
    assert x.shape == (2, 3, 4, 4)
    assert torch_close(x[0, 0], x[0, 1])  # grey repeated in RGB
    assert x[1, 0].min() == 1.0 and x[1, 1].max() == 0.0


def torch_close(a, b):
    return bool((a - b).abs().max() < 1e-6)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "holds no class folders"),
        (lambda p: (p / "a").mkdir(parents=True), "holds no images"),
        (lambda p: ((p / "a").mkdir(parents=True), (p / "a" / "1.png").write_bytes(b"junk")),
         "cannot read the image"),
    ],
)  # fmt: skip
def test_bad_folders_are_one_line_errors(tmp_path, make, says):
    root = tmp_path / "imgs"
    make(root)
    with pytest.raises(ConfigError, match=says) as e:
        read_image_folder(root)
    assert "\n" not in str(e.value)
