"""Distillation across tokenizers: Gemma 3 270M → a layer-dropped SmolLM2-135M student (ULD).

    .venv/bin/python bench/distill_xtok.py --steps 100 --threads 1
    .venv/bin/python bench/distill_xtok.py --teacher smollm2-135m --student gemma3-270m --steps 20

The student keeps SmolLM2's embeddings, final norm, head and blocks 0, 3, ..., 27 (10 of 30,
`--every 3`, as `lfm distill lm`). It is trained twice under the same budget (steps, learning
rate, seed, data order) on pieces of about `--block-size` student tokens of BBC News training
articles: with its LM loss only, and with LM + ULD + shared-vocabulary KL from Gemma 3 (262,144
tokens against SmolLM2's 49,152; `lfm.distill.xtok.uld`, paper weights 1 : 1.5, T = 1, KL
weight 1), Gemma's logits read under no_grad at the positions where both tokenizations close.
Reports held-out perplexity of each student on its own tokens of BBC test articles (after BOS
where its tokenizer adds one), the full SmolLM2 and the untrained student for reference, and the
seconds of each run. The second command is the reverse direction: SmolLM2 teaches Gemma 3 with
one block in `--every` (6 of 18).
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm.assets import load_dataset, load_model
from lfm.core.layouts import num_layers
from lfm.core.train import TrainConfig
from lfm.distill.lm import perplexity
from lfm.distill.xtok import ULDConfig, held_out_blocks, layer_dropped, text_blocks, uld


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", default="gemma3-270m")
    p.add_argument("--student", default="smollm2-135m", help="the student's family (and tokenizer)")
    p.add_argument("--every", type=int, default=3, help="keep one block in EVERY")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--block-size", type=int, default=64, help="student tokens per training text")
    p.add_argument("--batch-size", type=int, default=2, help="texts per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--uld-top-k", type=int, default=0, help="ULD sorts the top K only (0: all)")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def compare(teacher, family, steps: int, a: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(name, held-out perplexity, seconds) of the full `family` model, its untrained
    layer-dropped copy, and that copy trained with LM only and with LM + ULD + shared KL."""
    bbc = load_dataset("bbc-news")
    train_texts = text_blocks(family.tokenizer, bbc.train_texts, a.block_size,
                              steps * a.batch_size)  # fmt: skip
    test = held_out_blocks(family.tokenizer, bbc.test_texts, a.block_size, a.eval_blocks)
    cfg = ULDConfig(batch_size=a.batch_size, top_k=a.uld_top_k)
    t_cfg = TrainConfig(steps=steps, lr=a.lr, seed=a.seed)
    t0 = time.time()
    rows = [(f"{family.name} (full, reference)", perplexity(family.model, test), time.time() - t0)]
    rows.append(("student, untrained", perplexity(layer_dropped(family, a.every).model, test), 0.0))
    for name, run_cfg in (
        ("student, LM only", cfg.replace(uld_weight=0.0, shared_kl_weight=0.0)),
        ("student, LM + ULD + shared KL", cfg),
    ):
        t0 = time.time()
        student = layer_dropped(family, a.every)
        result = uld(teacher, student, train_texts, run_cfg, train_cfg=t_cfg)
        rows.append((name, perplexity(result.student, test), time.time() - t0))
    return rows


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    teacher, family = load_model(a.teacher), load_model(a.student)
    rows = compare(teacher, family, a.steps, a)
    n = num_layers(family.model)
    print(f"\n{teacher.name} (vocab {teacher.vocab_size:,}) → {family.name} (vocab "
          f"{family.vocab_size:,}), {n} layers → {len(range(0, n, a.every))} (every {a.every}); "
          f"{a.steps} steps × {a.batch_size} texts of ~{a.block_size} student tokens, lr {a.lr}; "
          f"perplexity on {a.eval_blocks} × {a.block_size} held-out BBC tokens (the student's)")  # fmt: skip
    print(f"{'model':<36} {'ppl':>12} {'vs LM only':>11} {'s':>8}")
    lm_only = rows[2][1]
    for name, ppl, secs in rows:
        print(f"{name:<36} {ppl:12.2f} {ppl / lm_only:10.3f}× {secs:8.1f}")


if __name__ == "__main__":
    main()
