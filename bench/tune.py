"""Benchmark: gradient-based tuning methods on BBC News, 16 examples per class.

    python bench/tune.py                       # defaults sized for a 2-core CPU (about 10 minutes)
    python bench/tune.py --seeds 3 --steps 40 --eval-per-class 40 --max-chars 1200

`smollm2-135m` classifies through label words (prompt "Article: ...\\nTopic:", words business /
entertainment / politics / sport / technology); `minilm-l6` through a new linear head on mean-pooled
states. Accuracy is on a fixed held-out subset (the first `--eval-per-class` test articles of each
class), articles cut to `--max-chars` characters. Each method trains with its config's learning rate
(`lfm.tuning` paper defaults) for `--steps` AdamW steps of `--batch-size` examples (the encoder
`--encoder-step-factor` times as many); an encoder's new head trains at `--head-lr`. Each method
runs through its registered tuner (`lfm.registry.get(method, area="tuning")`; `--methods` takes
registry names, hyphens read as underscores). Zero-shot has no seed and runs once. Peak memory is
the growth of the process's resident set over the run (CPU) or the CUDA peak. `--wise` runs full
FT as the `wise_ft` tuner (the same fine-tuning, then the interpolation) and adds its curve
(α = 0, .25, .5, .75, 1), where α = 0 is the untrained model (for an encoder: its random head).

One torch thread is the default: on a 2-core machine shared with other jobs, two threads made a
MiniLM step about 10x slower (3.8 s against 0.38 s) by spinning on the busy cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lfm.assets import load_dataset, load_model
from lfm.core.measure import Meter
from lfm.core.train import TrainConfig
from lfm.registry import get
from lfm.tuning.methods import FullFTConfig, WiseFTConfig
from lfm.tuning.tasks import TextClassification, bbc_verbalizer, few_shot, held_out
from lfm.tuning.trainer import HEAD_LR, classifier, evaluator

METHODS = [
    "zero-shot",
    "full_ft",
    "bitfit",
    "lora",
    "dora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "lp_ft",
]


def _task(args, data, model: str, texts, y) -> TextClassification:
    """Label words for the causal LM (prompts cut to `--max-chars`), raw cut texts for an encoder."""
    if model == "smollm2-135m":
        verb = bbc_verbalizer(data.classes, args.max_chars)
        return TextClassification(texts, y, verb, max_tokens=args.max_tokens)
    cut = [t[: args.max_chars] for t in texts]
    return TextClassification(cut, y, n_classes=len(data.classes), max_tokens=args.max_tokens)


def run_one(args, data, model: str, method: str, seed: int) -> dict:
    handle = load_model(model)
    ev = _task(args, data, model, *held_out(data, args.eval_per_class))
    encoder = ev.verbalizer is None
    steps = args.steps * (args.encoder_step_factor if encoder else 1)
    t0 = time.perf_counter()
    with Meter(handle.model) as mem:
        extra, n_train = {}, 0
        if method == "zero-shot":
            clf = classifier(handle.model, handle.tokenizer, ev)
            acc = evaluator(handle.tokenizer, ev)(clf)["acc"]
        else:
            train = _task(args, data, model, *few_shot(data, args.shots, seed))
            spec = get(method, area="tuning")
            wise = args.wise and spec.name == "full_ft"  # the same fine-tuning, then WiSE-FT
            spec = get("wise_ft", area="tuning") if wise else spec
            cfg = WiseFTConfig(lr=FullFTConfig().lr) if wise else spec.config()
            tcfg = TrainConfig(steps=steps, lr=cfg.lr, seed=seed, progress=False)
            res = spec.fn(handle, train, cfg, train_cfg=tcfg, eval_data=ev, seed=seed,
                          batch_size=args.batch_size, head_lr=args.head_lr, inplace=True)  # fmt: skip
            acc = res.metrics["fine_tuned_acc" if wise else "acc"]
            n_train = res.metrics["trainable_parameters"]
            if wise:
                extra["wise"] = res.metrics["curve"]
    return {
        "acc": acc,
        "params": n_train,
        "mem": mem.result.peak_mib,
        "time": time.perf_counter() - t0,
        "cost": mem.result,
        "steps": 0 if method == "zero-shot" else steps,
        "model_params": sum(p.numel() for p in handle.model.parameters()),
        **extra,
    }


def _fmt(xs: list[float]) -> str:
    return (
        f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"
        if len(xs) > 1
        else f"{xs[0]:.3f}"
    )


def _record(model: str, method: str, rs: list[dict], args) -> None:
    """One row per tuner and model: held-out accuracy, the cost per training step."""
    from lfm.core.measure import total
    from lfm.pipeline.plan import record

    acc = 100 * statistics.mean(r["acc"] for r in rs)
    steps = sum(r["steps"] for r in rs)
    cost = total([r["cost"] for r in rs])
    summary = (f"{acc:.1f}% on BBC News, {args.shots} shots/class, {rs[0]['steps']} steps, "
               f"{cost.cpu_s / steps:.1f} CPU-s per step")  # fmt: skip
    record(f"tuning/{method}", acc, summary, "python bench/tune.py " + " ".join(sys.argv[1:]),
           model=model, unit="step", units=steps, cost=cost, params=rs[0]["model_params"],
           trainable=rs[0]["params"], seeds=len(rs))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument(
        "--steps", type=int, default=20, help="optimizer steps (the encoder gets x factor)"
    )
    p.add_argument("--encoder-step-factor", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-per-class", type=int, default=10)
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--head-lr", type=float, default=HEAD_LR, help="lr of an encoder's new head")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 on a busy 2-core box is ~10x slower)",
    )
    p.add_argument("--wise", action="store_true", help="WiSE-FT curve (α = 0 .. 1) after full FT")
    p.add_argument(
        "--record",
        action="store_true",
        help="write each tuner's figures to the table `lfm plan --task classify` reads",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("bbc-news")
    print(f"BBC News: {args.shots}/class train, {args.eval_per_class}/class held-out, {args.steps} steps, "
          f"{args.seeds} seed(s), articles cut to {args.max_chars} chars", flush=True)  # fmt: skip
    print("| model | method | accuracy | trainable params | peak mem (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        for method in args.methods:
            method = method if method == "zero-shot" else get(method, area="tuning").name
            if method == "zero-shot" and model != "smollm2-135m":
                continue  # an encoder's new head has no zero-shot prediction
            seeds = range(1 if method == "zero-shot" else args.seeds)  # zero-shot has no seed
            rs = []
            for s in seeds:
                rs.append(run_one(args, data, model, method, s))
                print(f"{model} {method} seed {s}: {rs[-1]['acc']:.3f} in {rs[-1]['time']:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
            print(f"| {model} | {method} | {_fmt([r['acc'] for r in rs])} | {rs[0]['params']:,} | "
                  f"{max(r['mem'] for r in rs):.0f} | {statistics.mean(r['time'] for r in rs):.1f} |", flush=True)  # fmt: skip
            if args.record and method != "zero-shot":
                _record(model, method, rs, args)
            if "wise" in rs[0]:
                for i, (a, _) in enumerate(rs[0]["wise"]):
                    accs = [r["wise"][i][1] for r in rs]
                    print(f"| {model} | wise_ft α={a:g} | {_fmt(accs)} | | | |", flush=True)


if __name__ == "__main__":
    main()
