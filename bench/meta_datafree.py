"""Data-free meta-learning benchmark: meta-test accuracy from a pool of models, no data.

A pool of 5-way ConvNet classifiers (BatchNorm with running statistics) is trained, each on its
own 5 of the 24 meta-train classes of rotated `digits` (or `fashion-mnist`). Their data is then
discarded. On 5-way 1- and 5-shot episodes of the 8 held-out classes, mean accuracy ± 95 %
interval over `--test-tasks` episodes for:

- `untrained`: a ProtoNet on a random ConvNet (what inversion must beat);
- `finetune-pool`: one pool model with a new head fitted on the support set (the baseline);
- `datafree_whitebox` (PURER-like, arXiv 2303.11183): inversion through the pool's weights;
- `datafree_blackbox` (BiDf-MKD-like, arXiv 2305.18413): zeroth-order inversion through
  SCORES handles, plus distillation; the number of pool queries is printed.

Each learner runs by its registered name on a `ModelPool` of handles narrowed to the access it
declares, and is meta-tested the way it adapts (prototypes).

Defaults fit a shared 2-core CPU (about 10 minutes); the papers meta-train far longer:

    python bench/meta_datafree.py --steps 2000 --pool 8 --data fashion-mnist
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm.access import LocalClassifier, narrow
from lfm.meta import ModelPool, meta_test, rotated_digit_splits
from lfm.meta.baseline import FinetuneConfig, fresh_head, train_pool
from lfm.meta.models import ConvNet
from lfm.registry import get, load_all, run

SIZES = {"digits": 8, "fashion-mnist": 28}


def build_pool(train, args) -> list:
    size = SIZES[args.data]
    make = lambda: ConvNet(5, args.pool_width, 4, size, running=True)  # noqa: E731
    n, steps = args.pool, args.pool_steps
    return train_pool(train, make, n_models=n, ways=5, steps=steps, seed=args.seed)


def learner(args) -> ConvNet:
    torch.manual_seed(args.seed)
    return ConvNet(64, args.width, 4, SIZES[args.data])


def row(name: str, shots: int, method: str, r: dict, extra: str = "") -> None:
    print(
        f"| {name} | {shots}-shot | {method} | {r['mean']:.4f} ± {r['ci95']:.4f} | "
        f"{r['seconds']:.0f} s | {extra} |",
        flush=True,
    )


def timed(fn) -> dict:
    start = time.perf_counter()
    out = fn()
    return {**out, "seconds": time.perf_counter() - start}


def meta_learn(pool, shape, args) -> dict:
    """Learners meta-trained from the pool (once, on 1-shot pseudo episodes), with timings."""
    common = {"steps": args.steps, "shots": 1, "queries": 5, "inv_steps": args.inv_steps}
    out = {}
    for name in ("datafree_whitebox", "datafree_blackbox"):
        spec = get(f"meta/{name}")
        level = spec.access.name.lower()  # handles that give what the method declares, no more
        source = ModelPool([narrow(LocalClassifier(m), level) for m in pool], shape)
        start = time.perf_counter()
        result = run(spec.key, learner(args), source, cfg=common, seed=args.seed)
        queries = result.history.queries
        note = f"{queries} pool queries" if queries else ""
        out[name] = (result, time.perf_counter() - start, note)
    return out


def evaluate(pool, trained: dict, shots: int, args) -> None:
    """Rows of one shot setting: untrained, finetune-pool and the data-free learners."""
    _, _, test = rotated_digit_splits(
        args.data, seed=args.seed, per_class=args.per_class, ways=5, shots=shots, queries=5
    )
    n, name = args.test_tasks, f"{args.data}-rot 5-way"
    untrained = timed(lambda: meta_test(learner(args), test, "protonets", n_tasks=n))
    row(name, shots, "untrained", untrained)
    base = fresh_head(pool[0], 5).eval()  # the pool model keeps its own BatchNorm statistics
    row(
        name,
        shots,
        "finetune-pool",
        timed(lambda: meta_test(base, test, "anil", FinetuneConfig(), n_tasks=n)),
    )
    for key, (result, secs, note) in trained.items():
        r = timed(lambda m=result: meta_test(m, test, n_tasks=n))
        row(name, shots, key, {**r, "seconds": r["seconds"] + secs}, note)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", choices=tuple(SIZES), default="digits")
    p.add_argument("--per-class", type=int, default=300, help="images kept per base class")
    p.add_argument("--pool", type=int, default=4, help="pool models")
    p.add_argument("--pool-steps", type=int, default=150, help="Adam steps per pool model")
    p.add_argument("--pool-width", type=int, default=16, help="pool ConvNet filters per block")
    p.add_argument("--width", type=int, default=32, help="meta-learner ConvNet filters")
    p.add_argument("--steps", type=int, default=100, help="data-free meta-updates")
    p.add_argument("--inv-steps", type=int, default=10, help="inversion steps per episode draw")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_all()  # the registry's first look-up imports every area: not inside a timed call
    train, _, _ = rotated_digit_splits(args.data, seed=args.seed, per_class=args.per_class)
    start = time.perf_counter()
    pool = build_pool(train, args)
    print(f"pool: {args.pool} models in {time.perf_counter() - start:.0f} s", flush=True)
    shape = tuple(train.pools[0].shape[1:])
    trained = meta_learn(pool, shape, args)
    print("| data | shots | method | accuracy ± 95 % CI | time | note |\n|---|---|---|---|---|---|")
    for shots in (1, 5):
        evaluate(pool, trained, shots, args)


if __name__ == "__main__":
    main()
