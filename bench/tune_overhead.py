"""Benchmark: the cost of the `lora` tuner (the shared Accelerate loop) over a hand loop.

    python bench/tune_overhead.py                   # smollm2-135m, LoRA, 6 steps x 3 repeats
    python bench/tune_overhead.py --steps 10 --repeats 5 --max-chars 100

The same LoRA job twice: `lfm.tuning.peft_methods.lora(handle, task, ...)` (the adapter, the
batches, Accelerator, parameter groups, the micro-batch stream, logging) against PEFT's
`get_peft_model`, `torch.optim.AdamW` and a plain for-loop over the same batches (BBC News, 16
articles per class drawn by `--seed`, label words of SmolLM2, batches of `--batch-size`). Both draw
the LoRA init under `--seed` and the dropout masks from the same RNG state, so the losses must
match (printed as a check that it is the same job).

Each repeat times both paths back to back, in alternating order, after one untimed warm-up step of
each; seconds per step count everything from the call (the optimizer and, for lfm, the
Accelerator) to the last step. Medians over the repeats of wall time and of process CPU time (the
latter is steadier on a shared machine); the ratio lfm / hand should be <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import time

import peft
import torch
import torch.nn.functional as F

from lfm.assets import load_dataset, load_model
from lfm.core.train import TrainConfig
from lfm.tuning.classify import class_batches, label_token_ids
from lfm.tuning.peft_methods import LoraConfig, lora
from lfm.tuning.tasks import TextClassification, bbc_verbalizer, few_shot


def _job(args):
    data, handle = load_dataset("bbc-news"), load_model(args.model, kind="causal-lm")
    verb = bbc_verbalizer(data.classes, args.max_chars)
    task = TextClassification(*few_shot(data, args.shots, args.seed), verb)
    batches = class_batches(
        handle.tokenizer, task.prompts(), task.labels, args.batch_size, args.seed
    )
    return task, batches


def run_lfm(args, task, batches, steps: int) -> list[float]:
    """The library path: the `lora` tuner with LoRA's paper config."""
    handle = load_model(args.model, kind="causal-lm")
    tcfg = TrainConfig(steps=steps, lr=LoraConfig().lr, seed=args.seed, progress=False)
    res = lora(
        handle, task, train_cfg=tcfg, seed=args.seed, batch_size=args.batch_size, inplace=True
    )
    return res.history


def run_hand(args, task, batches, steps: int) -> list[float]:
    """The same job by hand: PEFT, AdamW and a for-loop."""
    handle = load_model(args.model, kind="causal-lm")
    ids = torch.tensor(label_token_ids(handle.tokenizer, task.verbalizer.label_words))
    cfg = LoraConfig()
    torch.manual_seed(args.seed)
    lm = peft.get_peft_model(
        handle.model,
        peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            task_type=peft.TaskType.CAUSAL_LM,
        ),
    )  # fmt: skip
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=cfg.lr)
    torch.manual_seed(args.seed)
    lm.train()
    losses = []
    for step in range(steps):
        b = batches[step % len(batches)]
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1)
        loss = F.cross_entropy(logits.logits[:, -1][:, ids], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _timed(fn, *a) -> tuple[float, float, list[float]]:
    w, c = time.perf_counter(), time.process_time()
    losses = fn(*a)
    return time.perf_counter() - w, time.process_time() - c, losses


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-chars", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task, batches = _job(args)
    paths = {"lfm": run_lfm, "hand": run_hand}
    for fn in paths.values():
        fn(args, task, batches, 1)  # warm-up, untimed
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    losses: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
            w, c, losses[name] = _timed(paths[name], args, task, batches, args.steps)
            wall[name].append(w / args.steps)
            cpu[name].append(c / args.steps)
            print(
                f"repeat {r} {name}: {w / args.steps:.3f} s/step wall, {c / args.steps:.3f} cpu",
                flush=True,
            )
    gap = max(abs(a - b) for a, b in zip(losses["lfm"], losses["hand"], strict=True))
    print(f"\n{args.model}, LoRA, {args.steps} steps of {args.batch_size}, {args.repeats} repeats; "
          f"max |loss lfm - loss hand| = {gap:.2e}")  # fmt: skip
    print("| path | s/step wall (median, min-max) | s/step CPU (median, min-max) |")
    print("|---|---|---|")
    for name in paths:
        print(f"| {name} | {statistics.median(wall[name]):.3f} ({min(wall[name]):.3f}-{max(wall[name]):.3f}) | "
              f"{statistics.median(cpu[name]):.3f} ({min(cpu[name]):.3f}-{max(cpu[name]):.3f}) |")  # fmt: skip
    ratio_w = statistics.median(wall["lfm"]) / statistics.median(wall["hand"])
    ratio_c = statistics.median(cpu["lfm"]) / statistics.median(cpu["hand"])
    print(f"ratio lfm / hand: {ratio_w:.3f} (wall), {ratio_c:.3f} (CPU)")


if __name__ == "__main__":
    main()
