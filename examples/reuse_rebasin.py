"""Align two small CNNs trained from different initialisations (Git Re-Basin weight matching) and
compare the loss along the linear path between them before and after alignment.

    .venv/bin/python examples/reuse_rebasin.py [--out runs/example-rebasin]

Trains two Conv-BN-ReLU networks (`lfm.core.tiny.TinyCNN`, 32 channels) on scikit-learn's 8x8
digits (offline, about 70 s of CPU time on two threads), aligns the second to the first with the
registered aligner `lfm.reuse.rebasin.rebasin`, and writes a PNG and the numbers as JSON.
BatchNorm statistics are recomputed at every point of the path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from lfm.assets import load_dataset
from lfm.core.tiny import TinyCNN
from lfm.reuse.connect import classification_eval, interpolation_path, plot_paths, save_paths
from lfm.reuse.rebasin import rebasin


def cnn() -> TinyCNN:
    # global average pooling before the head keeps channels as features: a chain spec fits
    return TinyCNN(n_out=10, width=32)


def train(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> TinyCNN:
    torch.manual_seed(seed)
    model = cnn()
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
    sa, aligned = rebasin([a, b])  # B's hidden units permuted into A's coordinates
    sb = b.state_dict()
    evaluate = classification_eval(ds.x_test, ds.y_test)
    bn = list(ds.x_train.split(256))
    paths = {
        "naive": interpolation_path(cnn(), sa, sb, evaluate, bn_batches=bn),
        "weight matching": interpolation_path(cnn(), sa, aligned, evaluate, bn_batches=bn),
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
