"""Distil a small MLP teacher into a smaller student: KD through a SCORES-only handle, hints through
a HIDDEN one, and both losses at once with the white-box teacher.

.venv/bin/python examples/distill_kd_mlp.py
"""

from __future__ import annotations

import torch
from torch import nn

from lfm.access import LocalClassifier, narrow
from lfm.core.train import TrainConfig
from lfm.distill import distill, kd_loss
from lfm.distill.losses import KDConfig
from lfm.errors import AccessError
from lfm.registry import run


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher, x = LocalClassifier(mlp(64)), torch.randn(512, 16)
    gap = lambda s: kd_loss(s(x), teacher.model(x), KDConfig(temperature=1.0)).item()  # noqa: E731
    cfg = TrainConfig(steps=150, lr=1e-2, progress=False)
    batches = list(x.split(64))  # micro-batches of inputs, cycled by the training loop

    student = mlp(8)
    before = gap(student)
    run("distill/kd", narrow(teacher, "scores"), student, batches, train_cfg=cfg)
    print(f"KD through a SCORES handle: KL(teacher ‖ student) {before:.3f} → {gap(student):.3f}")

    hint = {"student_module": "0", "teacher_module": "0"}  # the first Linear layers
    try:
        run("distill/fitnets", narrow(teacher, "scores"), mlp(8), batches, train_cfg=cfg, **hint)
    except AccessError as e:
        print(f"refused: {e}")
    res = run("distill/fitnets", narrow(teacher, "hidden"), mlp(8), batches, train_cfg=cfg, **hint)
    hint_loss = res.history.losses
    print(f"FitNets through a HIDDEN handle: hint loss {hint_loss[0]:.3f} → {hint_loss[-1]:.3f}")

    student = mlp(8)
    losses = [("kd", 1.0, None), ("fitnets", 0.5, None, "0", "0")]
    distill(teacher, student, batches, losses, train_cfg=cfg)
    print(f"KD + FitNets with WEIGHTS access: KL(teacher ‖ student) → {gap(student):.3f}")


if __name__ == "__main__":
    main()
