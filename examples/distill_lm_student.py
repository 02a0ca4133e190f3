"""Distil SmolLM2-135M into a student with a third of its blocks (DistilBERT-style, arXiv 1910.01108).

    .venv/bin/python examples/distill_lm_student.py --steps 20

The student copies the teacher's embeddings, final norm, head and blocks 0, 3, ..., 27; it is
trained on BBC News text with KD on every token position plus the LM loss, then compared with the
teacher by held-out perplexity. On a CPU keep the steps few; on a GPU try `--steps 1500
--block-size 128 --batch-size 8` (see docs/distill.md for measured numbers).
"""

from __future__ import annotations

import argparse

import torch

from lfm.assets import load_dataset, load_model
from lfm.core.train import TrainConfig
from lfm.distill.lm import LMStudentConfig, lm_student, perplexity, token_blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(2)

    teacher = load_model("smollm2-135m", device=a.device)  # a LocalModel: WEIGHTS access
    bbc = load_dataset("bbc-news")
    train = token_blocks(teacher.tokenizer, bbc.train_texts, a.block_size, a.steps * a.batch_size)
    test = token_blocks(teacher.tokenizer, bbc.test_texts, a.block_size, max_blocks=8)

    cfg = LMStudentConfig(every=3, block_size=a.block_size, batch_size=a.batch_size)
    # student None: built from the teacher, one block in three
    res = lm_student(teacher, None, train, cfg, train_cfg=TrainConfig(steps=a.steps, lr=5e-4))
    student, history = res.student, res.history
    print(f"loss {history.losses[0]:.2f} → {history.losses[-1]:.2f}")
    print(f"perplexity: teacher {perplexity(teacher.model, test):.1f}, "
          f"student {perplexity(student, test):.1f}")  # fmt: skip
    print("student continues 'The government said':",
          teacher.decode(student.generate(torch.tensor([teacher.encode("The government said")],
                         device=a.device), max_new_tokens=12, do_sample=False)[0].tolist()))  # fmt: skip


if __name__ == "__main__":
    main()
