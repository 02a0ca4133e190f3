"""Distillation benchmark, vision with data: Fashion-MNIST CNN teacher → small CNN student.

    .venv/bin/python bench/distill.py --train-size 10000 --teacher-steps 400 --student-steps 200

Reports test accuracy (mean ± std over seeds) of the teacher, the student trained alone, and the
student trained with each registered loss (`lfm.distill.vision.METHODS`: KD, reverse KL, top-k KD,
DIST, FitNets, AT, RKD, PKT; each added to cross-entropy), all under the same budget (steps, batch
size, learning rate). Every run goes through `lfm.core.train.train`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lfm.core.measure import Meter, total
from lfm.core.train import TrainConfig
from lfm.distill.vision import (
    METHODS,
    accuracy,
    load_fashion_mnist,
    subsample,
    train_student,
    train_teacher,
)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train-size", type=int, default=10_000, help="training images used")
    p.add_argument("--test-size", type=int, default=5_000, help="test images used")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--student-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--record",
        action="store_true",
        help="write each loss's figures to the table `lfm plan --task distill` reads",
    )
    return p.parse_args()


def _fmt(accs: list[float]) -> str:
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{100 * statistics.mean(accs):6.2f} ± {100 * sd:4.2f}"


def _record(method: str, accs: list[float], cost, teacher: torch.nn.Module, a) -> None:
    """One row per loss: test accuracy, and the cost per student step (teacher calls, CPU)."""
    import sys

    from lfm.pipeline.plan import record

    acc = 100 * statistics.mean(accs)
    steps = a.student_steps * a.seeds
    summary = (f"student {acc:.1f}% on Fashion-MNIST after {a.student_steps} steps, "
               f"{cost.cpu_s / steps * 1000:.0f} CPU-ms per step")  # fmt: skip
    record(f"distill/{method}", acc, summary, "python bench/distill.py " + " ".join(sys.argv[1:]),
           model="fashion-mnist-cnn", unit="step", units=steps, cost=cost,
           params=sum(p.numel() for p in teacher.parameters()), seeds=a.seeds)  # fmt: skip


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    data = subsample(load_fashion_mnist(), a.train_size, a.test_size)
    cfg = TrainConfig(lr=a.lr, progress=False)
    t0 = time.time()
    teacher = train_teacher(data, cfg.replace(steps=a.teacher_steps), a.batch_size)
    rows = [("teacher (16-32-32)", [accuracy(teacher, data.x_test, data.y_test)], time.time() - t0)]
    for method in a.methods.split(","):
        t0, accs, costs = time.time(), [], []
        for seed in range(a.seeds):
            s_cfg = cfg.replace(steps=a.student_steps, seed=seed)
            with Meter(teacher) as meter:
                student = train_student(method, teacher, data, s_cfg, a.batch_size)
            costs.append(meter.result)
            accs.append(accuracy(student, data.x_test, data.y_test))
        rows.append((f"student (8-16-16) {method}", accs, (time.time() - t0) / a.seeds))
        if a.record and method != "student":  # the student alone is no distillation method
            _record(method, accs, total(costs), teacher, a)
    print(f"\nFashion-MNIST, {a.train_size} train / {a.test_size} test images, batch {a.batch_size}, "
          f"teacher {a.teacher_steps} steps, students {a.student_steps} steps, {a.seeds} seeds")  # fmt: skip
    print(f"{'model':<28} {'test acc %':>14} {'s/run':>7}")
    for name, accs, secs in rows:
        print(f"{name:<28} {_fmt(accs):>14} {secs:7.1f}")


if __name__ == "__main__":
    main()
