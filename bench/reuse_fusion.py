"""Benchmark: model fusion at small scale (FusionBench-style) and re-basin loss barriers.

Fusion: a shared MLP backbone (784-256-128) is pretrained on a subset of Fashion-MNIST; four tasks
are fine-tuned from it, each with its own 5-way head (linear probe, then full fine-tuning):
Fashion-MNIST classes 0-4 and 5-9, digits 0-4 and 5-9 (8x8 digits upsampled to 28x28). Backbones
are merged by every method (heads are not merged: task k uses head k) and each merged backbone is
scored on every task's test set, against the individual fine-tuned models and the output ensemble
(task k: every backbone with head k). λ of task arithmetic / TIES / DARE is picked from a small
grid on a labelled validation split, as the task-arithmetic paper does; AdaMerging uses unlabelled
test inputs only; Fisher and RegMean statistics come from 256 training inputs per task, saved as
files and merged through them. The table itself is `lfm.reuse.fusion.fusion_table`, shared with
`reuse_fusion_vision.py` (MobileNetV2 experts).

Re-basin: two MLPs (784-256-256-10) trained from different initialisations on Fashion-MNIST;
loss along the linear path before and after weight matching (PNG + JSON in --out).

    .venv/bin/python bench/reuse_fusion.py            # defaults: 5-10 minutes on 1 busy core
    .venv/bin/python bench/reuse_fusion.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm.assets import load_dataset
from lfm.core.io import write_json
from lfm.reuse.connect import classification_eval, interpolation_path, plot_paths, save_paths
from lfm.reuse.fusion import FusionConfig, FusionResult, FusionTask, fusion_table
from lfm.reuse.rebasin import rebasin

LAMBDAS = (0.3, 0.5, 0.7, 1.0)


class Backbone(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (784, 256, 128)):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(widths[0], widths[1]), nn.Linear(widths[1], widths[2])

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)))))


class Net(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def tasks(n_train: int, n_test: int) -> list[dict]:
    """Four 5-way tasks: (x_train, y_train, x_val, y_val, x_test, y_test) with labels 0..4."""
    fm, dg = load_dataset("fashion-mnist"), load_dataset("digits")
    up = lambda x: F.interpolate(x, size=28, mode="bilinear", align_corners=False)  # noqa: E731
    out = []
    for name, ds, lo in (
        ("fmnist0-4", fm, 0),
        ("fmnist5-9", fm, 5),
        ("digits0-4", dg, 0),
        ("digits5-9", dg, 5),
    ):
        tr = (ds.y_train >= lo) & (ds.y_train < lo + 5)
        te = (ds.y_test >= lo) & (ds.y_test < lo + 5)
        xtr, ytr = ds.x_train[tr][: n_train + 200], ds.y_train[tr][: n_train + 200] - lo
        xte, yte = ds.x_test[te][:n_test], ds.y_test[te][:n_test] - lo
        if xtr.shape[-1] != 28:
            xtr, xte = up(xtr), up(xte)
        nv = min(200, len(xtr) // 5)
        out.append({"name": name, "train": (xtr[nv:], ytr[nv:]), "val": (xtr[:nv], ytr[:nv]),
                    "test": (xte, yte)})  # fmt: skip
    return out


def train(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, params=None, seed=0
) -> nn.Module:
    """Plain SGD with momentum; cross-entropy; batches of 64."""
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def backbone_sd(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def finetune(base: dict, task: dict, epochs: int, seed: int) -> tuple[dict, nn.Module, nn.Module]:
    """Linear probe then full fine-tuning; returns the backbone, the head and the probe head."""
    bb = Backbone()
    bb.load_state_dict(base)
    net = Net(bb, nn.Linear(128, 5))
    torch.manual_seed(seed)
    train(net, *task["train"], epochs=epochs, lr=0.05, params=net.head.parameters(), seed=seed)
    probe = copy.deepcopy(net.head).eval()
    train(net, *task["train"], epochs=epochs, lr=0.01, seed=seed + 1)
    return backbone_sd(bb), net.head.eval(), probe


def fusion(args: argparse.Namespace, out: Path) -> FusionResult:
    fm = load_dataset("fashion-mnist")
    ts = tasks(args.n_train, args.n_test)
    torch.manual_seed(0)
    pre = Net(Backbone(), nn.Linear(128, 10))
    train(pre, fm.x_train[: args.n_pretrain], fm.y_train[: args.n_pretrain], epochs=1, lr=0.02)
    base = backbone_sd(pre.backbone)
    fts = [finetune(base, t, args.epochs, seed=10 + k) for k, t in enumerate(ts)]
    fusion_tasks = [FusionTask(t["name"], head, t["val"], t["test"], t["train"][0][: args.n_stats], probe)
                    for t, (_, head, probe) in zip(ts, fts, strict=True)]  # fmt: skip
    cfg = FusionConfig(lambdas=LAMBDAS, ada_steps=args.ada_steps, ada_lr=args.ada_lr, ada_batch=64)
    return fusion_table(Backbone(), base, [f[0] for f in fts], fusion_tasks, out, cfg)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def rebasin_barrier(args: argparse.Namespace, out: Path) -> dict:
    fm = load_dataset("fashion-mnist")
    x, y = fm.x_train[: args.n_rebasin].flatten(1), fm.y_train[: args.n_rebasin]
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(train(mlp(), x, y, epochs=args.epochs, lr=0.02, seed=seed))
    a, b = (backbone_sd(m) for m in models)
    aligned = rebasin(models)[1]  # B permuted into A's coordinates (spec from A's module)
    ev = classification_eval(fm.x_test[: args.n_test].flatten(1), fm.y_test[: args.n_test])
    paths = {
        "naive": interpolation_path(mlp(), a, b, ev),
        "weight matching": interpolation_path(mlp(), a, aligned, ev),
    }
    plot_paths(paths, out / "rebasin.png", title="Fashion-MNIST MLP: A (t=0) to B (t=1)")
    save_paths(paths, out / "rebasin.json")
    return paths


# The rows that are one registered merge at its paper's setting (AdaMerging: layer-wise).
RECORDED = {"average": "linear", "task arithmetic": "task_arithmetic", "TIES": "ties",
            "DARE-TIES": "dare_ties", "Fisher": "fisher", "RegMean": "regmean",
            "AdaMerging (layer-wise)": "adamerging"}  # fmt: skip


def _record(res, a) -> None:
    """One row per merge: mean accuracy over the four tasks, cost per expert merged."""
    import sys

    from lfm.pipeline.plan import record

    n = len(res.tasks)
    params = sum(p.numel() for p in Backbone().parameters())
    for label, name in RECORDED.items():
        acc, cost = 100 * sum(res.rows[label]) / n, res.costs[label]
        summary = (f"{acc:.1f}% mean over {n} tasks merging {n} MLP experts, "
                   f"{cost.cpu_s / n:.1f} CPU-s per expert")  # fmt: skip
        record(f"reuse/{name}", acc, summary,
               "python bench/reuse_fusion.py " + " ".join(sys.argv[1:]),
               model="fusion-mlp", unit="model", units=n, cost=cost, params=params)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-pretrain", type=int, default=3000)
    ap.add_argument("--n-train", type=int, default=2000, help="fine-tuning examples per task")
    ap.add_argument("--n-test", type=int, default=2000, help="test examples per task (at most)")
    ap.add_argument("--n-stats", type=int, default=256, help="inputs for Fisher / Gram statistics")
    ap.add_argument("--n-rebasin", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ada-steps", type=int, default=200)
    ap.add_argument("--ada-lr", type=float, default=1e-3, help="paper: 1e-3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-reuse-fusion"))
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument(
        "--record",
        action="store_true",
        help="write each merge's figures to the table `lfm plan --task merge` reads",
    )
    a = ap.parse_args()
    if a.quick:
        a.n_pretrain, a.n_train, a.n_test, a.n_rebasin, a.ada_steps, a.epochs = (
            1000,
            400,
            300,
            2000,
            20,
            1,
        )
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = fusion(a, a.out)
    print("\n" + res.markdown() + f"\n\nchoices: {res.notes}\n")
    if a.record:
        _record(res, a)
    paths = rebasin_barrier(a, a.out)
    print("\nre-basin (test loss barrier along the linear path, accuracy at t=0.5):")
    for label, p in paths.items():
        print(f"  {label:<16} barrier {p['barrier'][0]:.3f}   acc(t=0.5) {100 * p['accuracy'][5]:.1f}%  "
              f"(endpoints {100 * p['accuracy'][0]:.1f}% / {100 * p['accuracy'][-1]:.1f}%)")  # fmt: skip
    write_json(a.out / "fusion.json", {"rows": res.rows, "notes": res.notes})
    print(
        f"\nwrote {a.out}/fusion.json, rebasin.json, rebasin.png in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
