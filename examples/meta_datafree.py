"""Data-free meta-learning: meta-learn a few-shot learner from a pool of classifiers, no data.

Trains four 5-way ConvNets, each on its own rotated-digit classes, then forgets their data.
A prototypical network is meta-learned from the pool through its weights (`datafree_whitebox`,
PURER-like) and through its scores only (`datafree_blackbox`, BiDf-MKD-like: the pool handles are
narrowed to SCORES), and tested on 5-way 1-shot episodes of unseen digits.

    .venv/bin/python examples/meta_datafree.py --steps 100
"""

from __future__ import annotations

import argparse

import torch

from lfm.access import LocalClassifier, narrow
from lfm.meta import (
    ConvNet,
    ModelPool,
    datafree_blackbox,
    datafree_whitebox,
    meta_test,
    rotated_digit_splits,
)
from lfm.meta.baseline import train_pool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100, help="data-free meta-updates")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, _, test = rotated_digit_splits(per_class=300, ways=5, shots=1, queries=5)
    make = lambda: ConvNet(5, 16, 4, 8, running=True)  # noqa: E731
    pool = train_pool(train, make, n_models=4, ways=5, steps=150)  # the data ends here
    learner = LocalClassifier(ConvNet(64, 32, 4, 8))
    weights = ModelPool([LocalClassifier(m) for m in pool], (1, 8, 8))
    white = datafree_whitebox(learner, weights, {"steps": args.steps})
    scores = ModelPool([narrow(LocalClassifier(m), "scores") for m in pool], (1, 8, 8))
    black = datafree_blackbox(learner, scores, {"steps": args.steps})  # no weights behind these
    r = meta_test(learner, test, "protonets", n_tasks=300)
    print(f"untrained  5-way 1-shot accuracy {r['mean']:.3f} ± {r['ci95']:.3f}")
    for name, result in (("white-box", white), ("black-box", black)):
        r = meta_test(result, test, n_tasks=300)  # prototypes, as the method adapts
        print(f"{name:10s} 5-way 1-shot accuracy {r['mean']:.3f} ± {r['ci95']:.3f}")
    print(f"black-box pool queries: {black.history.queries}")


if __name__ == "__main__":
    main()
