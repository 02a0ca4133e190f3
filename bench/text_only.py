"""Benchmark: text-only instruction optimisation (APE's step, then OPRO's) of SmolLM2-135M.

Protocol (that of `bench/blackbox.py`): BBC News, `--shots` training examples per class (the
few-shot set, drawn per seed), a fixed held-out subset of `--test-per-class` test articles per
class (the first of each class), articles cut to `--max-chars` characters. The target is
SmolLM2-135M served at TEXT in this process (`running(build_app(Backend(model, "text")))` on
127.0.0.1) and reached only through `RemoteModel(url, access="text")`: it answers by generation
(`answer_tokens` tokens, greedy), and an answer is right when the first label word it names is the
gold one. The proposer is the same SmolLM2 held locally (its chat template). Rows:

- zero-shot: the template alone (`Article: {text}\\nTopic:`), no instruction, answered by generation;
- manual instruction: `MANUAL` (written by hand, it names the five topics), then the template;
- OPRO: the instruction `lfm.tuning.opro.opro` finds (`--steps` OPRO steps after APE's step, each
  of `--candidates` proposals; the other settings are the config's paper defaults), per seed,
  starting from the empty instruction (OPRO's) or, with `--start manual`, from `MANUAL`;
- reference: the template's label words scored through SCORES (`bench/blackbox.py`'s "manual
  prompt, zero-shot" row), on the same model held locally.

"calls" are HTTP requests to the served target (one per scored instruction on the few-shot set,
one per held-out evaluation); the proposer is called once per step, locally. Seeds run as separate
processes (each loads the model and serves it again):
    .venv/bin/python bench/text_only.py --parts baselines --threads 1
    .venv/bin/python bench/text_only.py --parts opro --seeds 1 --first-seed 0 --threads 1  # and 1, 2
The papers' budget (OPRO: 8 instructions per step, up to 200 steps) needs a GPU:
    .venv/bin/python bench/text_only.py --parts opro --steps 200 --candidates 8 --test-per-class 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfm.access import narrow
from lfm.assets import load_dataset, load_model
from lfm.serve import Backend, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.opro import InstructionPrompt, OproConfig, generate_labels, opro
from lfm.tuning.tasks import (
    TextClassification,
    accuracy,
    bbc_verbalizer,
    class_scores,
    few_shot,
    held_out,
)

MANUAL = (
    "Classify the news article by its topic: business, entertainment, politics, sport or "
    "technology."
)


def args_() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--parts", default="baselines,opro", help="comma list of baselines,opro")
    add("--shots", type=int, default=16, help="train examples per class (prompt search: 16)")
    add("--test-per-class", type=int, default=10, help="held-out test articles per class (0: all)")
    add("--max-chars", type=int, default=200, help="article cut (tasks default: 1200)")
    add("--seeds", type=int, default=3)
    add("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1")
    add("--steps", type=int, default=2, help="OPRO steps after APE's step (OPRO: up to 200)")
    add("--candidates", type=int, default=2, help="instructions proposed per step (OPRO: 8)")
    add("--start", choices=("empty", "manual"), default="empty",
        help="OPRO's starting instruction: the empty one (OPRO's) or MANUAL")  # fmt: skip
    add("--threads", type=int, default=1, help="torch threads (busy shared CPU: 1 is fastest)")
    return p.parse_args()


def remote(url: str) -> RemoteModel:
    # chunk above the few-shot set: one scored instruction is one HTTP call
    return RemoteModel(url, access="text", chunk=512, timeout=1200.0)


def text_accuracy(url: str, p: InstructionPrompt, texts, y) -> dict:
    """Held-out accuracy of an instruction answered by generation, its calls and wall time."""
    h, t = remote(url), time.perf_counter()
    pred = generate_labels(h, p, texts)
    return {"acc": float((pred == y).float().mean()), "no_label": int((pred < 0).sum()),
            "calls": h.calls, "s": round(time.perf_counter() - t, 1)}  # fmt: skip


def baselines(a, url: str, lm, verb, test_x, test_y) -> list[dict]:
    rows = []
    for name, ins in (
        ("zero-shot (no instruction), TEXT", ""),
        ("manual instruction, TEXT", MANUAL),
    ):
        rows.append({"method": name, "seed": None, **text_accuracy(url, InstructionPrompt(ins, verb), test_x, test_y)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
    acc = accuracy(class_scores(narrow(lm, "scores"), test_x, verb), test_y)
    rows.append({"method": "reference: template label words, SCORES", "seed": None, "acc": acc,
                 "calls": 0, "s": round(time.perf_counter() - t, 1)})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    return rows


def opro_row(a, url: str, lm, data, verb, test_x, test_y, seed: int) -> dict:
    x, y = few_shot(data, a.shots, seed)
    start = MANUAL if a.start == "manual" else ""
    cfg = OproConfig(instruction=start, steps=a.steps, candidates=a.candidates)
    h, t = remote(url), time.perf_counter()
    res = opro(h, TextClassification(x, y, verb), cfg, proposer=lm, seed=seed)
    search_s, train_calls = time.perf_counter() - t, h.calls
    test = text_accuracy(url, res.best, test_x, test_y)
    name = f"OPRO ({a.steps} steps x {a.candidates} cand., start {a.start}), TEXT"
    return {"method": name, "seed": seed,
            "acc": test["acc"], "no_label": test["no_label"], "calls": train_calls + test["calls"],
            "train_calls": train_calls, "s": round(search_s + test["s"], 1),
            "search_s": round(search_s, 1), "train_score": [res.start_score, res.best_score],
            "instruction": res.best.instruction, "evaluations": res.evaluations,
            "skipped": res.skipped, "proposer_calls": len(res.history),
            "tried": res.instructions}  # fmt: skip


def summary(rows: list[dict]) -> None:
    print(f"\n{'method':<44} {'acc mean ± sd':>14}  {'per seed':<20} {'calls':>6} {'s':>7}")
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        accs = [r["acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        each = " / ".join(f"{v:.2f}" for v in accs)
        print(f"{name:<44} {statistics.mean(accs):7.3f} ± {sd:4.3f}  {each:<20} "
              f"{statistics.mean(r['calls'] for r in rs):6.0f} {statistics.mean(r['s'] for r in rs):7.1f}")  # fmt: skip


def main() -> None:
    a = args_()
    torch.set_num_threads(a.threads)
    parts = set(a.parts.split(","))
    data = load_dataset("bbc-news")
    verb = bbc_verbalizer(data.classes, a.max_chars)
    test_x, test_y = held_out(data, a.test_per_class)
    lm = load_model("smollm2-135m")  # served at TEXT, and the proposer
    print(f"# {vars(a)}", flush=True)
    rows: list[dict] = []
    with running(build_app(Backend(lm, "text"), ServeSettings())) as url:
        if "baselines" in parts:
            rows += baselines(a, url, lm, verb, test_x, test_y)
        if "opro" in parts:
            for seed in range(a.first_seed, a.first_seed + a.seeds):
                rows.append(opro_row(a, url, lm, data, verb, test_x, test_y, seed))
                print(json.dumps(rows[-1]), flush=True)
    summary(rows)


if __name__ == "__main__":
    main()
