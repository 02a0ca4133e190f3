"""Meta-learning benchmark: post-adaptation error on held-out tasks, mean ± 95 % interval.

1. Sinusoid regression (MAML, Finn et al. 2017, arXiv 1703.03400, Sec. 5.1 and Fig. 2): the
   40-40 ReLU MLP, K = 5 and 10 support points, MSE on 100 query points after `--test-steps`
   SGD steps at α = 0.01, for MAML, FOMAML, Reptile and the pretrained-then-fine-tuned baseline.
2. 5-way 1- and 5-shot classification on rotated image classes (`--data digits` 8×8 or
   `fashion-mnist` 28×28; base classes split 6/2/2 before rotating, so test classes are unseen):
   MAML, FOMAML, ANIL, Meta-SGD, Reptile, ProtoNets on the 4-block ConvNet of MAML Sec. 5.2, and
   the Baseline of Chen et al. 2019 (arXiv 1904.04232: train on all 24 meta-train classes, fit a
   new head on each support set), accuracy on the queries.

Defaults are sized for a shared 2-core CPU (about 10 minutes); the papers train far longer.
One run can be split over processes by shot count and method, each writing its rows as JSON:

    python bench/meta.py --only classification --cls-steps 600 --shots 1 --out /tmp/d1.json
    python bench/meta.py --only classification --data fashion-mnist --cls-steps 400 \
        --shots 5 --methods maml metasgd --out /tmp/f5a.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lfm.core.io import atomic_path
from lfm.core.measure import Meter
from lfm.meta import MLP, SinusoidTasks, meta_test, rotated_digit_splits
from lfm.meta.baseline import FinetuneConfig, class_data, fresh_head, train_classifier
from lfm.meta.models import ConvNet
from lfm.registry import get, run

SIN_METHODS = ("maml", "fomaml", "reptile", "pretrain")
CLS_METHODS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonets")
ALL_CLS = (*CLS_METHODS, "finetune")
SIZES = {"digits": 8, "fashion-mnist": 28}


def run_one(key: str, model, train, test, overrides: dict, args) -> dict:
    """Meta-train one method by its name, meta-test it the way it adapts; score and times."""
    spec = get(f"meta/{key}")
    fields = spec.config.model_fields
    cfg = spec.config.build({k: v for k, v in overrides.items() if k in fields})
    start, cpu = time.perf_counter(), time.process_time()
    with Meter(model) as meter:
        result = run(spec.key, model, train, cfg=cfg, seed=args.seed, progress=args.progress)
    score = meta_test(result, test, cfg=cfg, n_tasks=args.test_tasks)
    hist = result.history
    return {
        **score,
        "cost": meter.result,
        "steps": cfg.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "final_loss": sum(hist.loss[-20:]) / len(hist.loss[-20:]),  # meta-loss, last 20 steps
    }


def sinusoid(args, rows: list[tuple]) -> None:
    for shots in (5, 10):
        for key in SIN_METHODS:
            torch.manual_seed(args.seed)
            model = MLP(1, 1, (40, 40))
            over = {"steps": args.sin_steps, "test_inner_steps": args.test_steps}
            r = run_one(key, model, SinusoidTasks(shots, 10), SinusoidTasks(shots, 100), over, args)
            emit(rows, ("sinusoid", f"{shots}-shot", key, r), args)


def finetune_baseline(train, test, args) -> dict:
    """Chen et al. Baseline: a classifier on all meta-train classes, a new head per episode
    fitted by ANIL's head-only SGD (`FinetuneConfig`)."""
    torch.manual_seed(args.seed)
    start, cpu = time.perf_counter(), time.process_time()
    x, y = class_data(train)
    net = ConvNet(len(train.classes), args.width, 4, SIZES[args.data])
    net = train_classifier(net, x, y, steps=args.cls_steps * 2, seed=args.seed)
    score = meta_test(fresh_head(net, 5), test, "anil", FinetuneConfig(), n_tasks=args.test_tasks)
    return {
        **score,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


def classification(args, rows: list[tuple]) -> None:
    name = f"{args.data}-rot 5-way"
    for shots in args.shots:
        train, _, test = rotated_digit_splits(
            args.data, seed=args.seed, per_class=args.per_class, ways=5, shots=shots, queries=5
        )
        for key in (m for m in CLS_METHODS if m in args.methods):
            torch.manual_seed(args.seed)
            adapts = "inner_lr" in get(f"meta/{key}").config.model_fields  # else an embedding
            model = ConvNet(5 if adapts else 64, args.width, 4, SIZES[args.data])
            over = {
                "steps": args.cls_steps,
                "inner_lr": 0.1 if key == "reptile" else 0.4,  # MAML Omniglot α = 0.4
                "test_inner_steps": 3,
                "meta_batch": args.cls_batch,
            }
            r = run_one(key, model, train, test, over, args)
            emit(rows, (name, f"{shots}-shot", key, r), args)
            if args.record and shots == max(args.shots):
                _record(key, shots, r, args)
        if "finetune" in args.methods:
            r = finetune_baseline(train, test, args)
            emit(rows, (name, f"{shots}-shot", "finetune", r), args)


def _record(key: str, shots: int, r: dict, args) -> None:
    """One row per learner: 5-way accuracy on held-out classes, cost per meta-update."""
    import sys

    from lfm.pipeline.plan import record

    acc = 100 * r["mean"]
    cost = r["cost"]
    summary = (f"{acc:.1f}% 5-way {shots}-shot on {args.data}-rot after {r['steps']} updates, "
               f"{cost.cpu_s / r['steps']:.2f} CPU-s per update")  # fmt: skip
    record(f"meta/{key}", acc, summary, "python bench/meta.py " + " ".join(sys.argv[1:]),
           model=f"{args.data}-convnet", unit="meta-update", units=r["steps"], cost=cost,
           params=r["params"], shots=shots)  # fmt: skip


def emit(rows: list[tuple], row: tuple, args) -> None:
    """Print a table row; with `--out`, rewrite the JSON of all rows so far (atomically)."""
    rows.append(row)
    task, shots, key, r = row
    print(
        f"| {task} | {shots} | {key} | {r['metric']} | {r['mean']:.4f} ± {r['ci95']:.4f} "
        f"| {r['seconds']:.0f} s | {r.get('cpu_seconds', 0):.0f} s |",
        flush=True,
    )
    if args.out:
        keys = ("task", "shots", "method")
        table = [{**dict(zip(keys, x[:3], strict=False)), **_plain(x[3])} for x in rows]
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps({"args": vars(args), "rows": table}, indent=1))


def _plain(r: dict) -> dict:
    """A row as JSON can hold it (the cost as its fields)."""
    return {k: (vars(v) if k == "cost" else v) for k, v in r.items()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sin-steps", type=int, default=300, help="meta-updates per sinusoid method")
    p.add_argument("--cls-steps", type=int, default=60, help="meta-updates per few-shot method")
    p.add_argument("--cls-batch", type=int, default=4, help="episodes per few-shot meta-update")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="few-shot K values")
    p.add_argument(
        "--methods", nargs="+", choices=ALL_CLS, default=list(ALL_CLS), help="few-shot methods"
    )
    p.add_argument("--out", default=None, help="also write the rows and settings to this JSON")
    p.add_argument("--data", choices=tuple(SIZES), default="digits", help="rotated image set")
    p.add_argument("--per-class", type=int, default=300, help="images kept per base class")
    p.add_argument("--width", type=int, default=32, help="ConvNet filters per block")
    p.add_argument(
        "--test-steps", type=int, default=10, help="fine-tuning steps at sinusoid meta-test"
    )
    p.add_argument("--test-tasks", type=int, default=600, help="held-out tasks / episodes")
    p.add_argument("--only", choices=("sinusoid", "classification"), default=None)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--record",
        action="store_true",
        help="write each few-shot learner's figures to the table `lfm plan --task meta` reads",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| task | shots | method | metric | mean ± 95 % CI | wall | CPU |")
    print("|---|---|---|---|---|---|---|")
    rows: list[tuple] = []
    if args.only in (None, "sinusoid"):
        sinusoid(args, rows)
    if args.only in (None, "classification"):
        classification(args, rows)


if __name__ == "__main__":
    main()
