"""Distillation benchmark, data-free: Fashion-MNIST CNN teacher → small CNN student without data.

    .venv/bin/python bench/distill_datafree.py --iterations 150 --batch-size 64

Reports test accuracy of the teacher, of the student trained on real data (cross-entropy, the
upper reference), and of students that never see an image: DAFL (generator through the teacher's
weights), DFAD (adversarial, gradients through the teacher) and DFME (adversarial, the teacher
answers only log-probabilities; zeroth-order gradients), with their teacher queries.
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm.core.train import TrainConfig
from lfm.distill.vision import (
    DATAFREE,
    accuracy,
    load_fashion_mnist,
    subsample,
    train_datafree,
    train_student,
    train_teacher,
)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train-size", type=int, default=10_000, help="images the teacher sees")
    p.add_argument("--test-size", type=int, default=5_000)
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--student-steps", type=int, default=200, help="real-data student's steps")
    p.add_argument("--iterations", type=int, default=150, help="generator updates per method")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--methods", default=",".join(DATAFREE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    data = subsample(load_fashion_mnist(), a.train_size, a.test_size)
    cfg = TrainConfig(lr=3e-3, seed=a.seed, progress=False)
    t0 = time.time()
    teacher = train_teacher(data, cfg.replace(steps=a.teacher_steps), a.batch_size)
    rows = [
        ("teacher (16-32-32)", accuracy(teacher, data.x_test, data.y_test), 0, time.time() - t0)
    ]
    t0 = time.time()
    real = train_student("student", teacher, data, cfg.replace(steps=a.student_steps), a.batch_size)
    rows.append(
        ("student, real data", accuracy(real, data.x_test, data.y_test), 0, time.time() - t0)
    )
    for method in a.methods.split(","):
        t0 = time.time()
        student, queries = train_datafree(method, teacher, a.iterations, a.batch_size, a.seed)
        acc = accuracy(student, data.x_test, data.y_test)
        rows.append((f"student, {method}", acc, queries, time.time() - t0))
    print(f"\nFashion-MNIST, teacher on {a.train_size} images ({a.teacher_steps} steps); data-free "
          f"students {a.iterations} generator updates × batch {a.batch_size}; {a.test_size} test images")  # fmt: skip
    print(f"{'model':<22} {'test acc %':>10} {'queries':>10} {'s':>7}")
    for name, acc, queries, secs in rows:
        print(f"{name:<22} {100 * acc:10.2f} {queries:10d} {secs:7.1f}")


if __name__ == "__main__":
    main()
