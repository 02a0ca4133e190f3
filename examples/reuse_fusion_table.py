"""A fusion table in FusionBench's form for a small conv net on digits, in about 10 seconds.

    .venv/bin/python examples/reuse_fusion_table.py

A conv backbone (conv + BatchNorm, a depthwise conv, a 1x1 conv, global pooling) is pretrained on
digits 0-4, then fine-tuned on three tasks with their own heads: digits 5-9, the parity of a digit
and the digits flipped upside down (10-way). `lfm.reuse.fusion.fusion_table` merges the backbones
with every method (RegMean on every conv, depthwise included) and prints per-task accuracy.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm.assets import load_dataset
from lfm.reuse.fusion import FusionConfig, FusionTask, fusion_table


def backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
        nn.Conv2d(32, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def train(bb: nn.Module, head: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    """Adam on backbone and head; BatchNorm in eval mode after pretraining (statistics kept)."""
    opt = torch.optim.Adam([*bb.parameters(), *head.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            loss = F.cross_entropy(head(bb(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_dataset("digits")
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    bb = backbone()
    lo = ytr < 5
    train(bb.train(), nn.Linear(64, 5), xtr[lo], ytr[lo], epochs=15, seed=0)
    bb.eval()  # from here on BatchNorm keeps the pretrained running statistics
    base = copy.deepcopy(bb.state_dict())
    specs = {  # name: (input transform, label map, classes, training subset)
        "digits 5-9": (lambda x: x, lambda y: y - 5, 5, lambda y: y >= 5),
        "parity": (lambda x: x, lambda y: y % 2, 2, lambda y: y >= 0),
        "upside down": (lambda x: x.flip(2), lambda y: y, 10, lambda y: y >= 0),
    }
    experts, tasks = [], []
    for k, (name, (tf, lab, classes, keep)) in enumerate(specs.items()):
        m, mt = keep(ytr), keep(yte)
        x, y, xt, yt = tf(xtr[m]), lab(ytr[m]), tf(xte[mt]), lab(yte[mt])
        net, head = copy.deepcopy(bb).eval(), nn.Linear(64, classes)
        train(net, head, x[100:], y[100:], epochs=15, seed=k + 1)
        experts.append(net.state_dict())
        tasks.append(FusionTask(name, head.eval(), (x[:100], y[:100]), (xt, yt), x[100:228]))
    with tempfile.TemporaryDirectory() as tmp:
        res = fusion_table(bb, base, experts, tasks, tmp, FusionConfig(ada_steps=50))
    print("\n" + res.markdown())
    print(f"λ chosen on validation: {res.notes}")


if __name__ == "__main__":
    main()
