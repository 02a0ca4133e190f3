"""A fusion table in FusionBench's form for a small conv net on digits, in about 15 seconds.

    .venv/bin/python examples/reuse_fusion_table.py

A conv backbone (conv + BatchNorm, a depthwise conv, a 1x1 conv, global pooling) is pretrained on
digits 0-4, then fine-tuned on three tasks with their own heads: digits 5-9, the parity of a digit
and the digits flipped upside down (10-way). `lfm.reuse.fusion.fusion_table` merges the backbones
with every method (RegMean on every conv, depthwise included) and prints per-task accuracy.
Then WEMoE (`reuse/wemoe`) upscales the three convs into weight-ensembling MoEs and trains their
routers on the unlabelled test inputs, once with the paper's settings and once with the softmax
gate, one routing per batch and information maximisation (docs/reuse.md, "Mixture of experts").
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm.assets import load_dataset
from lfm.registry import run
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
    wemoe(bb, base, experts, tasks)


@torch.no_grad()
def accuracy(model: nn.Module, task: FusionTask) -> float:
    """Test accuracy of one task through its head, in batches of that task alone."""
    x, y = task.test
    hits = sum(int((task.head(model(xb)).argmax(-1) == yb).sum())
               for xb, yb in zip(x.split(64), y.split(64), strict=True))  # fmt: skip
    return 100 * hits / len(y)


def wemoe(bb: nn.Module, base: dict, experts: list[dict], tasks: list[FusionTask]) -> None:
    """The convs `0`, `3` and `5` upscaled; routers trained 100 steps on unlabelled test inputs."""
    data = [list(t.test[0].split(16)) for t in tasks]  # per task: unlabelled batches
    heads = [t.head for t in tasks]
    ways = {
        "WEMoE, the paper's settings": {},
        "WEMoE, softmax gate, per batch, IM": {"gate": "softmax", "batch_reduce": True,
                                               "objective": "im", "lr": 1e-3},
    }  # fmt: skip
    for name, options in ways.items():
        cfg = {"modules": "0|3|5", "steps": 100, **options}
        res = run("reuse/wemoe", bb, experts, base, data, cfg=cfg, heads=heads)
        accs = [accuracy(res.model, t) for t in tasks]
        print(f"{name}: " + ", ".join(f"{t.name} {a:.1f}" for t, a in zip(tasks, accs, strict=True))
              + f"; mean {sum(accs) / len(accs):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
