"""Distillation benchmark, language models: SmolLM2-135M → a student with every k-th block.

    .venv/bin/python bench/distill_lm.py --steps 40 --block-size 64 --batch-size 4    # CPU
    python bench/distill_lm.py --steps 500 --block-size 128 --batch-size 8 --eval-blocks 64  # GPU

The student keeps the teacher's embeddings, final norm, head and blocks 0, 3, ..., 27 (10 of 30,
`--every 3`). It is trained twice under the same budget (steps, tokens, learning rate, seed, data
order) on BBC News training articles: with the LM loss only, and with KD (T², every position) +
LM loss (DistilBERT weights 5 : 2, T = 2). Reports held-out perplexity on BBC test articles of
the teacher, the untrained student, and both trained students, and the gap to the teacher.
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm.assets import load_dataset, load_model
from lfm.core.layouts import num_layers
from lfm.core.train import TrainConfig
from lfm.distill.lm import (
    LMStudentConfig,
    lm_student,
    perplexity,
    student_from_teacher,
    token_blocks,
)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--every", type=int, default=3, help="keep one block in EVERY")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--block-size", type=int, default=64, help="tokens per block")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    teacher = load_model(a.model, device=a.device)
    data = load_dataset("bbc-news")
    train_blocks = token_blocks(teacher.tokenizer, data.train_texts, a.block_size,
                                a.steps * a.batch_size)  # fmt: skip
    test_blocks = token_blocks(teacher.tokenizer, data.test_texts, a.block_size, a.eval_blocks)
    cfg = LMStudentConfig(every=a.every, temperature=a.temperature, block_size=a.block_size,
                          batch_size=a.batch_size)  # fmt: skip
    t_cfg = TrainConfig(steps=a.steps, lr=a.lr, seed=a.seed, progress=False)
    t0 = time.time()
    rows = [("teacher", perplexity(teacher.model, test_blocks), time.time() - t0)]
    init = student_from_teacher(teacher.model, a.every)
    rows.append(("student, untrained", perplexity(init, test_blocks), 0.0))
    for name, run_cfg in (
        ("student, LM only", cfg.replace(kd_weight=0.0)),
        ("student, KD + LM", cfg),
    ):
        t0 = time.time()
        student = lm_student(teacher, None, train_blocks, run_cfg, train_cfg=t_cfg).student
        rows.append((name, perplexity(student, test_blocks), time.time() - t0))
    n_layers = num_layers(teacher.model)
    print(f"\n{a.model}: {n_layers} layers → {num_layers(init)} (every {a.every}); "
          f"{a.steps} steps × {a.batch_size} × {a.block_size} tokens, lr {a.lr}, T {a.temperature}; "
          f"perplexity on {len(test_blocks)} × {a.block_size} held-out BBC tokens")  # fmt: skip
    print(f"{'model':<22} {'ppl':>10} {'gap to teacher':>15} {'s':>7}")
    for name, ppl, secs in rows:
        print(f"{name:<22} {ppl:10.2f} {ppl / rows[0][1]:14.2f}× {secs:7.1f}")


if __name__ == "__main__":
    main()
