"""Align two small CNNs trained from different initialisations (Git Re-Basin weight matching) and
compare the loss along the linear path between them before and after alignment.

    .venv/bin/python examples/reuse_rebasin.py [--out runs/example-rebasin]

Trains two Conv-BN-ReLU networks on scikit-learn's 8x8 digits (offline, about 70 s of CPU time
on two threads), aligns the second to the first with `lfm.reuse.rebasin`, and writes a PNG and the
numbers as JSON. BatchNorm statistics are recomputed at every point of the path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lfm.assets import load_dataset
from lfm.reuse.connect import classification_eval, interpolation_path, plot_paths, save_paths
from lfm.reuse.rebasin import chain_spec, rebasin


class CNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))  # global average pooling keeps channels as features


def train(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> CNN:
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/example-rebasin"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    ds = load_dataset("digits")
    a, b = train(1, ds.x_train, ds.y_train), train(2, ds.x_train, ds.y_train)
    sa, sb = a.state_dict(), b.state_dict()
    aligned, _ = rebasin(sa, sb, chain_spec(a))
    evaluate = classification_eval(ds.x_test, ds.y_test)
    bn = list(ds.x_train.split(256))
    paths = {
        "naive": interpolation_path(CNN(), sa, sb, evaluate, bn_batches=bn),
        "weight matching": interpolation_path(CNN(), sa, aligned, evaluate, bn_batches=bn),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot_paths(paths, args.out / "rebasin.png", title="digits CNN: A (t=0) to B (t=1)")
    save_paths(paths, args.out / "rebasin.json")
    for label, p in paths.items():
        mid = p["accuracy"][len(p["t"]) // 2]
        print(f"{label:<16} loss barrier {p['barrier'][0]:.3f}   accuracy at t=0.5 {mid:.1%}")
    print(f"wrote {args.out}/rebasin.png and rebasin.json")


if __name__ == "__main__":
    main()
