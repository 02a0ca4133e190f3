"""Distil a small MLP teacher into a smaller student through a SCORES-only handle, then with hints.

.venv/bin/python examples/distill_kd_mlp.py
"""

from __future__ import annotations

import torch
from torch import nn

from lfm.access import LocalClassifier, narrow
from lfm.core.train import TrainConfig, shuffled_batches
from lfm.distill import distill, kd_loss
from lfm.distill.losses import KDConfig
from lfm.errors import AccessError


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher, x = LocalClassifier(mlp(64)), torch.randn(512, 16)
    gap = lambda s: kd_loss(s(x), teacher.model(x), KDConfig(temperature=1.0)).item()  # noqa: E731
    cfg = TrainConfig(steps=150, lr=1e-2, progress=False)

    student = mlp(8)
    before = gap(student)
    distill(
        narrow(teacher, "scores"),
        student,
        shuffled_batches(x, batch_size=64),
        [("kd", 1.0, None)],
        cfg,
    )
    print(f"KD through a SCORES handle: KL(teacher ‖ student) {before:.3f} → {gap(student):.3f}")

    try:
        distill(narrow(teacher, "scores"), mlp(8), [(x,)], [("fitnets", 1.0, None, "0", "0")], cfg)
    except AccessError as e:
        print(f"refused: {e}")

    student = mlp(8)
    losses = [("kd", 1.0, None), ("fitnets", 0.5, None, "0", "0")]  # hint: first Linear layers
    distill(teacher, student, shuffled_batches(x, batch_size=64), losses, cfg)
    print(f"KD + FitNets with WEIGHTS access: KL(teacher ‖ student) → {gap(student):.3f}")


if __name__ == "__main__":
    main()
