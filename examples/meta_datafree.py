"""Data-free meta-learning: meta-learn a few-shot learner from a pool of classifiers, no data.

Trains four 5-way ConvNets, each on its own rotated-digit classes, then forgets their data.
A prototypical network is meta-learned from the pool through its weights (PURER-like) and
through its scores only (BiDf-MKD-like), and tested on 5-way 1-shot episodes of unseen digits.

    .venv/bin/python examples/meta_datafree.py --steps 100
"""

from __future__ import annotations

import argparse

import torch

from lfm.access import LocalClassifier, narrow
from lfm.meta import BlackBoxConfig, ConvNet, DataFreeConfig, meta_test, rotated_digit_splits
from lfm.meta.baseline import train_pool
from lfm.meta.datafree import blackbox, whitebox
from lfm.meta.protonets import ProtoNetsConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100, help="data-free meta-updates")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, _, test = rotated_digit_splits(per_class=300, ways=5, shots=1, queries=5)
    make = lambda: ConvNet(5, 16, 4, 8, running=True)  # noqa: E731
    pool = train_pool(train, make, n_models=4, ways=5, steps=150)  # the data ends here
    learner = ConvNet(64, 32, 4, 8)
    white, _ = whitebox(
        [LocalClassifier(m) for m in pool], learner, (1, 8, 8), DataFreeConfig(steps=args.steps)
    )
    scores = [narrow(LocalClassifier(m), "scores") for m in pool]  # no weights behind these
    black, hist = blackbox(scores, learner, (1, 8, 8), BlackBoxConfig(steps=args.steps))
    for name, net in (("untrained", learner), ("white-box", white), ("black-box", black)):
        r = meta_test(net, test, ProtoNetsConfig(), n_tasks=300)
        print(f"{name:10s} 5-way 1-shot accuracy {r['mean']:.3f} ± {r['ci95']:.3f}")
    print(f"black-box pool queries: {hist.queries}")


if __name__ == "__main__":
    main()
