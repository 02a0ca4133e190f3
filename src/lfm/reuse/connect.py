"""Loss and accuracy along the linear path between two models, and its barrier
(Frankle et al. 2020, arXiv 1912.05671; Ainsworth et al. 2022, arXiv 2209.04836):

    θ(t) = (1 − t) θ_A + t θ_B,     barrier = max_t [ L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B)) ]

Each point is a `linear` merge through the one driver. BatchNorm running statistics of an
interpolated network are not the statistics of its activations, so with `bn_batches` they are
recomputed on those inputs at every point (as the re-basin paper does for its ResNets).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lfm.core.io import write_json
from lfm.core.plot import save_png
from lfm.reuse.driver import merge_state_dicts

Evaluate = Callable[[nn.Module], tuple[float, float]]  # model -> (loss, accuracy)


@torch.no_grad()
def reset_bn(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Recompute BatchNorm running statistics as the plain mean over `batches`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    model.eval()


def interpolation_path(
    model: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    evaluate: Evaluate,
    n_points: int = 11,
    bn_batches: list[Tensor] | None = None,
) -> dict[str, list[float]]:
    """Loss and accuracy of `model` loaded with θ(t) at `n_points` evenly spaced t in [0, 1]."""
    out: dict[str, list[float]] = {"t": [], "loss": [], "accuracy": []}
    for t in torch.linspace(0, 1, n_points).tolist():
        sd = merge_state_dicts("linear", None, [a, b], weights=[1 - t, t])
        model.load_state_dict(sd)
        if bn_batches:
            reset_bn(model, bn_batches)
        model.eval()
        loss, acc = evaluate(model)
        for k, v in zip(("t", "loss", "accuracy"), (t, loss, acc), strict=True):
            out[k].append(float(v))
    out["barrier"] = [barrier(out["t"], out["loss"])]
    return out


def barrier(ts: list[float], losses: list[float]) -> float:
    """max_t L(t) − ((1 − t) L(0) + t L(1))."""
    lo, hi = losses[0], losses[-1]
    return max(v - ((1 - t) * lo + t * hi) for t, v in zip(ts, losses, strict=True))


def classification_eval(x: Tensor, y: Tensor, batch_size: int = 1024) -> Evaluate:
    """An `Evaluate` for a classifier on (x, y): mean cross-entropy and accuracy."""

    @torch.no_grad()
    def run(model: nn.Module) -> tuple[float, float]:
        loss, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            loss += float(
                nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
            )
            correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
        return loss / len(x), correct / len(x)

    return run


def plot_paths(paths: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy against t for each labelled path, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, p in paths.items():
        axes[0].plot(p["t"], p["loss"], marker="o", label=label)
        axes[1].plot(p["t"], p["accuracy"], marker="o", label=label)
    for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("t (0: model A, 1: model B)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def save_paths(paths: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """The numbers of each path (t, loss, accuracy, barrier) as JSON, written atomically."""
    return write_json(path, json.loads(json.dumps(paths)))
