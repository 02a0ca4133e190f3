"""Distillation benchmark, data-free: Fashion-MNIST CNN teacher → small CNN student without data.

    .venv/bin/python bench/distill_datafree.py --iterations 300 --di-batches 32 --threads 1

Reports test accuracy of the teacher, of the student trained on real data (cross-entropy, the
upper reference), and of students that never see an image: DeepInversion (images optimised
against the teacher's BatchNorm statistics, then KD), DAFL (generator through the teacher's
weights), DFAD (adversarial, gradients through the teacher) and DFME (adversarial, the teacher
answers only log-probabilities; zeroth-order gradients), with their teacher queries (forward
passes on single images) and the CPU seconds of this process.
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
    p.add_argument("--iterations", type=int, default=300, help="generator updates per game")
    p.add_argument("--di-batches", type=int, default=32, help="DeepInversion batches synthesised")
    p.add_argument("--di-steps", type=int, default=200, help="DeepInversion pixel updates a batch")
    p.add_argument("--kd-steps", type=int, default=1000, help="KD steps on DeepInversion images")
    p.add_argument("--competition", type=float, default=0.0, help="Adaptive DeepInversion α_c")
    p.add_argument("--generator-width", type=int, default=16, help="the games' generator width")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--methods", default=",".join(DATAFREE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    data = subsample(load_fashion_mnist(), a.train_size, a.test_size)
    cfg = TrainConfig(lr=3e-3, seed=a.seed, progress=False)
    t0 = time.process_time()
    teacher = train_teacher(data, cfg.replace(steps=a.teacher_steps), a.batch_size)
    acc = accuracy(teacher, data.x_test, data.y_test)
    rows = [("teacher (16-32-32)", acc, 0, time.process_time() - t0)]
    t0 = time.process_time()
    real = train_student("student", teacher, data, cfg.replace(steps=a.student_steps), a.batch_size)
    acc = accuracy(real, data.x_test, data.y_test)
    rows.append(("student, real data", acc, 0, time.process_time() - t0))
    for method in a.methods.split(","):
        t0 = time.process_time()
        student, queries = train_datafree(
            method, teacher, *_budget(a, method), a.seed, **_extra(a, method)
        )
        acc = accuracy(student, data.x_test, data.y_test)
        rows.append((f"student, {method}", acc, queries, time.process_time() - t0))
        print(rows[-1], flush=True)
    print(f"\nFashion-MNIST, teacher on {a.train_size} images ({a.teacher_steps} steps); games "
          f"{a.iterations} generator updates × batch {a.batch_size} (width {a.generator_width}); "
          f"DeepInversion {a.di_batches} × {a.batch_size} images × {a.di_steps} steps + {a.kd_steps} KD "
          f"steps; {a.test_size} test images")  # fmt: skip
    print(f"{'model':<24} {'test acc %':>10} {'queries':>10} {'CPU s':>7}")
    for name, acc, queries, secs in rows:
        print(f"{name:<24} {100 * acc:10.2f} {queries:10d} {secs:7.1f}")


def _budget(a: argparse.Namespace, method: str) -> tuple[int, int]:
    return (a.di_batches if method == "deep_inversion" else a.iterations), a.batch_size


def _extra(a: argparse.Namespace, method: str) -> dict:
    if method == "deep_inversion":
        return {"kd_steps": a.kd_steps, "steps": a.di_steps, "competition_weight": a.competition}
    return {"generator_width": a.generator_width}


if __name__ == "__main__":
    main()
