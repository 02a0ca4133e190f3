"""Learning curves as PNG: one panel per recorded metric, steps on x, the metric on y.

    curves({"loss": {"step": [1, 2, 3], "value": [2.1, 1.7, 1.5]}}, "runs/…/curves.png")

Runs call this through `Run.history`: a training command's curves land in its run directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lfm.core.io import atomic_path


def curves(
    history: Mapping[str, Mapping[str, list[Any]]], path: str | Path, title: str = ""
) -> Path:
    """Draw each series of `history` (name -> {"step": [...], "value": [...]}, and optionally
    "xlabel") in its own panel with labelled axes, and write the PNG atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(history)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        series = history[name]
        ax.plot(series["step"], series["value"], marker="o" if len(series["step"]) <= 30 else None,
                markersize=3)  # fmt: skip
        ax.set_xlabel(str(series.get("xlabel", "step")))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as a PNG atomically (no half-written file on a crash) and close
    it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
