"""Benchmark: a fusion table in FusionBench's form with MobileNetV2 experts on offline images.

Base: torchvision's ImageNet MobileNetV2 (`lfm.assets.load_model("mobilenet-v2")`), its feature
extractor with global average pooling (1280 features). Four image tasks built from the offline
data, grey images repeated to 3 channels at 32 x 32, ImageNet-normalised:

- fmnist: Fashion-MNIST, 10 classes;
- digits: scikit-learn digits (8 x 8 upsampled), 10 classes;
- fmnist-coarse-inv: Fashion-MNIST with inverted intensities, 4 coarse classes (tops, trousers and
  dresses, footwear, bags);
- fmnist-rot-pairs: Fashion-MNIST rotated by 90°, 5 classes that pair class c with class c + 5.

The Fashion-MNIST tasks use disjoint training and test images. Each task gets a linear probe on
the frozen base features (the "pretrained" row), then the whole backbone and the head are
fine-tuned from there (Adam, warm-up and cosine decay). BatchNorm stays in eval mode with the
ImageNet running statistics: its scale and shift are fine-tuned like any weight, the running
statistics stay those of the base, so every expert and every merge shares them. Experts are cached under the lfm cache
(`$LFM_CACHE`, default ~/.cache/lfm) keyed by the settings; a rerun skips training.

Backbones are merged by every method (`lfm.reuse.fusion.fusion_table`); task k is scored with
head k. λ of task arithmetic / TIES / DARE-TIES / Breadcrumbs / DELLA is chosen on 200 labelled
validation images per task from the task-arithmetic paper's grid 0.05, 0.10, ..., 1.0, α of
TSV-Merge / Iso-C / Iso-CTS from that grid and 1.25 ... 2.0; Fisher and RegMean (conv layers
included: Grams of unfolded patches, one per channel for the depthwise convs) use `--n-stats`
training inputs per task; AdaMerging learns on the unlabelled test inputs.

WEMoE (`lfm.reuse.wemoe`) upscales `--wemoe-modules` (default: the inverted-residual blocks of the
last two stages and the last 1x1 conv, features.14-18, 76 % of the parameters) into
weight-ensembling MoEs, merges the rest by task arithmetic at λ = 0.3, and trains the routers on
the unlabelled test inputs (16 per task and step, as AdaMerging); `--only-wemoe` prints only the
individual and WEMoE rows, for the same cached experts. `--wemoe-gate softmax` (coefficients on the
simplex), `--wemoe-batch-reduce` (one routing per batch of one task) and `--wemoe-objective im`
(information maximisation) are options beside the paper's linear per-sample gate and entropy
(docs/reuse.md measures them).

    .venv/bin/python bench/reuse_fusion_vision.py   # 14-19 CPU-minutes on 1 thread (busy host), WEMoE 4 more
    .venv/bin/python bench/reuse_fusion_vision.py --quick    # a smoke run
    .venv/bin/python bench/reuse_fusion_vision.py --only-wemoe --wemoe-steps 300   # WEMoE rows
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lfm.assets import cache_dir, load_dataset, load_model
from lfm.core.io import atomic_path, write_json
from lfm.reuse.fusion import FusionConfig, FusionResult, FusionTask, accuracy, fusion_table
from lfm.reuse.wemoe import WEMoEConfig, entropy, moe_modules, router, train_routers, upscale

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
COARSE = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])  # tops / trousers+dresses / footwear / bags
VERSION = 2  # bump when the way experts are built changes
WEMOE_MODULES = r"features\.(1[4-8])"  # upscaled by WEMoE: the last two stages and the last conv


class Features(nn.Module):
    """MobileNetV2's feature extractor with global average pooling: (B, 3, H, W) -> (B, 1280)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def prep(x: Tensor, size: int) -> Tensor:
    """Grey images (N, 1, H, W) in [0, 1] -> (N, 3, size, size), ImageNet-normalised."""
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return ((x.expand(-1, 3, -1, -1) - MEAN[:, None, None]) / STD[:, None, None]).contiguous()


def make_tasks(n_train: int, n_test: int, n_val: int, size: int) -> list[dict]:
    """Per task: name, classes, train / val / test (x, y); disjoint Fashion-MNIST slices."""
    fm, dg = load_dataset("fashion-mnist"), load_dataset("digits")
    n = n_train + n_val

    def fm_slice(i: int, transform, relabel) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xtr, ytr = fm.x_train[i * n : (i + 1) * n], fm.y_train[i * n : (i + 1) * n]
        xte, yte = (
            fm.x_test[i * n_test : (i + 1) * n_test],
            fm.y_test[i * n_test : (i + 1) * n_test],
        )
        return transform(xtr), relabel(ytr), transform(xte), relabel(yte)

    specs = [
        ("fmnist", 10, fm_slice(0, lambda x: x, lambda y: y)),
        ("digits", 10, (dg.x_train[:n], dg.y_train[:n], dg.x_test[:n_test], dg.y_test[:n_test])),
        ("fmnist-coarse-inv", 4, fm_slice(1, lambda x: 1 - x, lambda y: COARSE[y])),
        ("fmnist-rot-pairs", 5, fm_slice(2, lambda x: x.rot90(1, (2, 3)), lambda y: y % 5)),
    ]
    out = []
    for name, classes, (xtr, ytr, xte, yte) in specs:
        xtr, xte = prep(xtr, size), prep(xte, size)
        nv = min(n_val, len(xtr) // 5)
        out.append({"name": name, "classes": classes, "train": (xtr[nv:], ytr[nv:]),
                    "val": (xtr[:nv], ytr[:nv]), "test": (xte, yte)})  # fmt: skip
    return out


@torch.no_grad()
def features(bb: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([bb(xb) for xb in x.split(batch)])


def linear_probe(feats: Tensor, y: Tensor, classes: int, l2=1e-2, steps=300) -> nn.Linear:
    """L2-regularised logistic regression on frozen features (full-batch Adam).

    Without the penalty the probe overfits to huge logits and fine-tuning from it diverges.
    """
    head = nn.Linear(feats.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(feats), y) + l2 * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def finetune(bb: nn.Module, head: nn.Module, x: Tensor, y: Tensor, args, seed: int) -> None:
    """Backbone and head: Adam, 10 % linear warm-up then cosine decay, BatchNorm in eval mode.

    Frozen running statistics make the first steps fragile: plain Adam at 3e-4 or 1e-3 (and SGD
    without clipping) diverged on these tasks; 1e-4 with warm-up did not.
    """
    params = [*bb.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr)
    total = args.epochs * math.ceil(len(x) / args.batch)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    gen = torch.Generator().manual_seed(seed)
    bb.eval()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(args.batch):
            loss = F.cross_entropy(head(bb(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def settings_key(args) -> str:
    keys = ("n_train", "n_val", "epochs", "lr", "batch", "size", "seed")
    spec = {k: getattr(args, k) for k in keys} | {"version": VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_experts(base: nn.Module, tasks: list[dict], args) -> tuple[list[dict], list, list, dict]:
    """Train (or load from the cache) a probe head and an expert per task."""
    root = cache_dir() / "reuse-fusion-vision" / settings_key(args)
    sds, heads, probes = [], [], []
    cost = {"trained": 0, "cached": 0, "cpu_s": 0.0, "cached_cpu_s": 0.0}
    for k, t in enumerate(tasks):
        path = root / f"{t['name']}.safetensors"
        if not path.exists():
            t0 = time.process_time()
            torch.manual_seed(args.seed + k)
            probe = linear_probe(features(base, t["train"][0]), t["train"][1], t["classes"])
            bb, head = copy.deepcopy(base).eval(), nn.Linear(1280, t["classes"])
            head.load_state_dict(probe.state_dict())
            finetune(bb, head, *t["train"], args, seed=args.seed + k)
            tensors = {**{f"backbone.{n}": v for n, v in bb.state_dict().items()},
                       **{f"head.{n}": v for n, v in head.state_dict().items()},
                       **{f"probe.{n}": v for n, v in probe.state_dict().items()}}  # fmt: skip
            secs = time.process_time() - t0
            with atomic_path(path) as tmp:
                save_file({n: v.detach().contiguous() for n, v in tensors.items()}, str(tmp),
                          {"train_cpu_s": f"{secs:.1f}"})  # fmt: skip
            cost["trained"] += 1
            cost["cpu_s"] += secs
            print(f"  expert {t['name']}: trained in {secs:.0f} CPU s -> {path}")
        else:
            cost["cached"] += 1
            with safe_open(str(path), framework="pt") as f:
                cost["cached_cpu_s"] += float((f.metadata() or {}).get("train_cpu_s", "nan"))
        loaded = load_file(str(path))
        part = lambda p, d=loaded: {n.removeprefix(p): v for n, v in d.items() if n.startswith(p)}  # noqa: E731
        sds.append(part("backbone."))
        heads.append(_linear(part("head.")))
        probes.append(_linear(part("probe.")))
    return sds, heads, probes, cost


def _linear(sd: dict[str, Tensor]) -> nn.Linear:
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head.eval()


def wemoe_rows(base: nn.Module, sds: list[dict], fts: list[FusionTask], a) -> FusionResult:
    """WEMoE: the `--wemoe-modules` upscaled, routers trained on the unlabelled test inputs.

    Rows: WEMoE before its routers are trained (every coefficient near λ, 1/K with the softmax
    gate: task arithmetic up to the routers' small weights), after, and with oracle routing
    (task k's inputs sent to expert k in every upscaled module: what the upscaled model gives if
    the routers learn the task of each input; it reads the task labels, so it is a bound, not a
    method). Notes: the
    training objective before / after, the summed test entropy of the trained and the oracle
    routing, and per task the share of its test inputs whose largest routing weight goes to its
    own expert (mean over the upscaled modules).
    """
    res = FusionResult([t.name for t in fts])
    cfg = WEMoEConfig(modules=a.wemoe_modules, init=a.wemoe_init, lr=a.wemoe_lr,
                      steps=a.wemoe_steps, seed=a.seed, gate=a.wemoe_gate,
                      batch_reduce=a.wemoe_batch_reduce, objective=a.wemoe_objective)  # fmt: skip
    data = [list(t.test[0].split(a.ada_batch)) for t in fts]
    heads = [t.head.eval() for t in fts]
    t0 = time.process_time()
    model = upscale(base, base.state_dict(), sds, cfg)
    res.rows["WEMoE (routers at init)"], _, _ = wemoe_scores(model, fts)
    bar = tqdm(total=cfg.steps, desc="WEMoE routers", file=sys.stderr, mininterval=5)
    step = lambda i, h: (bar.update(), bar.set_postfix(objective=f"{h:.3f}", refresh=False))  # noqa: E731
    hist = train_routers(model, data, cfg, heads, progress=step)
    bar.close()
    res.rows["WEMoE"], own, ent = wemoe_scores(model, fts)
    res.seconds["WEMoE"] = time.process_time() - t0
    res.rows["WEMoE (oracle routing)"], _, oracle_ent = wemoe_scores(model, fts, oracle=True)
    res.notes |= {"wemoe_objective": (hist[0], hist[-1]) if hist else None,
                  "wemoe_test_entropy": (round(ent, 3), round(oracle_ent, 3)),
                  "wemoe_routed_to_own_expert": own,
                  "wemoe_modules": list(moe_modules(model))}  # fmt: skip
    return res


@torch.no_grad()
def wemoe_scores(model: nn.Module, fts: list[FusionTask], oracle=False, batch=64):
    """Test accuracy per task (head k on task k), per task the share of its inputs routed mostly
    to expert k (mean over the upscaled modules), and the summed mean test entropy. `oracle`:
    every upscaled module routes task k's inputs to expert k alone."""
    moes = list(moe_modules(model).values())
    routers, gates = [m.router for m in moes], [m.gate for m in moes]
    accs, own, ent = [], [], 0.0
    for k, t in enumerate(fts):
        if oracle:
            for m in moes:
                m.router = router(1, len(fts), 0.0, layers=0)  # a constant: one-hot on expert k
                m.gate = "linear"
                m.router.weight.copy_(torch.eye(len(fts))[k])
        hits, routed, h = 0, 0.0, 0.0
        for xb, yb in zip(t.test[0].split(batch), t.test[1].split(batch), strict=True):
            logits = t.head(model(xb))
            hits += int((logits.argmax(-1) == yb).sum())
            h += float(entropy(logits)) * len(xb)
            routed += sum(float((m.last_routing.argmax(-1) == k).sum()) for m in moes) / len(moes)
        accs.append(hits / len(t.test[1]))
        own.append(round(routed / len(t.test[1]), 3))
        ent += h / len(t.test[1])
    for m, r, g in zip(moes, routers, gates, strict=True):
        m.router, m.gate = r, g
    return accs, own, ent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=3000, help="fine-tuning images per task")
    ap.add_argument("--n-val", type=int, default=200, help="labelled validation images per task")
    ap.add_argument("--n-test", type=int, default=1000, help="test images per task (at most)")
    ap.add_argument("--n-stats", type=int, default=512, help="inputs for Fisher / Gram statistics")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak Adam learning rate")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--ada-steps", type=int, default=500, help="paper: 500")
    ap.add_argument("--ada-batch", type=int, default=16, help="paper: 16")
    ap.add_argument("--wemoe-modules", default=WEMOE_MODULES, help="regex of upscaled modules")
    ap.add_argument("--wemoe-init", type=float, default=0.3, help="λ; paper: 0.3")
    ap.add_argument("--wemoe-lr", type=float, default=1e-4, help="paper: 1e-4")
    ap.add_argument("--wemoe-steps", type=int, default=1000, help="paper: 1000")
    ap.add_argument(
        "--wemoe-gate",
        choices=("linear", "softmax"),
        default="linear",
        help="linear: the paper's; softmax: coefficients on the simplex",
    )
    ap.add_argument(
        "--wemoe-batch-reduce",
        action="store_true",
        help="one routing per batch (each batch holds one task), not per sample",
    )
    ap.add_argument(
        "--wemoe-objective",
        choices=("entropy", "im"),
        default="entropy",
        help="entropy: the paper's; im: minus the entropy of the batch-mean prediction",
    )
    ap.add_argument("--only-wemoe", action="store_true", help="only the individual and WEMoE rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-reuse-fusion-vision"))
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    a = ap.parse_args()
    if a.quick:
        a.n_train, a.n_val, a.n_test, a.n_stats, a.epochs, a.ada_steps = 400, 50, 200, 32, 1, 10
        a.wemoe_steps = 10
    torch.set_num_threads(a.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    tasks = make_tasks(a.n_train, a.n_test, a.n_val, a.size)
    base = Features(load_model("mobilenet-v2").model.features).eval()
    sds, heads, probes, cost = build_experts(base, tasks, a)
    print(
        f"experts: {cost['trained']} trained now in {cost['cpu_s']:.0f} CPU s, {cost['cached']} "
        f"loaded from the cache (built earlier in {cost['cached_cpu_s']:.0f} CPU s)"
    )
    fts = [FusionTask(t["name"], h, t["val"], t["test"], t["train"][0][: a.n_stats], p)
           for t, h, p in zip(tasks, heads, probes, strict=True)]  # fmt: skip
    cfg = FusionConfig(ada_steps=a.ada_steps, ada_batch=a.ada_batch, seed=a.seed)
    if a.only_wemoe:
        res = FusionResult([t.name for t in fts])
        res.rows["individual"] = [accuracy(base, sd, t.head, t.test)
                                  for sd, t in zip(sds, fts, strict=True)]  # fmt: skip
    else:
        res = fusion_table(base, base.state_dict(), sds, fts, a.out, cfg)
    moe = wemoe_rows(base, sds, fts, a)
    res.rows.update(moe.rows)
    res.notes.update(moe.notes)
    res.seconds.update(moe.seconds)
    print("\n" + res.markdown())
    print(f"\nchoices: {res.notes}\nCPU s per row: {res.seconds}")
    total = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    write_json(a.out / "fusion_vision.json", {"args": {k: str(v) for k, v in vars(a).items()},
               "rows": res.rows, "notes": res.notes, "seconds": res.seconds, "build": cost,
               "total": total})  # fmt: skip
    print(
        f"wrote {a.out}/fusion_vision.json; {total['cpu_s']:.0f} CPU s, {total['wall_s']:.0f} s wall"
    )


if __name__ == "__main__":
    main()
