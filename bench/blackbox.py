"""Benchmark: black-box tuning of SmolLM2-135M served on loopback, and the server under load.

1. BBC News few-shot (k per class from the train split, a fixed small test subset): accuracy of
   the manual prompt zero-shot, BBT (EMBEDDINGS), GrIPS-style prompt search (SCORES), both through
   `RemoteModel` against `lfm serve`-equivalent server on 127.0.0.1, and white-box MeZO; API calls
   and wall time per method. A LoRA column is left for the PEFT methods (`--lora` hook below).
2. The server under load: 32 concurrent clients for `--load-seconds`, dynamic batching vs one
   request at a time; failures, throughput ratio, p50/p99 latency.
3. Peak memory (child ru_maxrss) of a MeZO step vs a full fine-tuning step (AdamW) on the model.

Defaults are cut to finish in ~10 minutes on a busy 2-core CPU:
    .venv/bin/python bench/blackbox.py
The paper protocol (16 shots, 8,000 BBT calls, 3 seeds, full test split; hours on a GPU):
    .venv/bin/python bench/blackbox.py --shots 16 --test-per-class 0 --seeds 3 \
        --bbt-budget 8000 --bbt-tokens 50 --bbt-popsize 20 \
        --search-iters 10 --search-candidates 5 --search-demos 1 --mezo-steps 100000 --max-chars 1200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfm.access import narrow
from lfm.assets import load_dataset, load_model
from lfm.serve import Backend, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.bbt import BBTConfig, bbt, class_scores_bbt
from lfm.tuning.mezo import MeZOConfig, label_loss_fn, mezo
from lfm.tuning.prompt_search import PromptSearchConfig, prompt_search
from lfm.tuning.tasks import (
    BBC_LABEL_WORDS,
    BBC_TEMPLATE,
    Verbalizer,
    accuracy,
    class_scores,
    few_shot,
)


def args_() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shots", type=int, default=2, help="train examples per class (paper: 16)")
    p.add_argument("--test-per-class", type=int, default=4, help="test examples per class (0: all)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--max-chars", type=int, default=200, help="article cut (tasks default: 1200)")
    p.add_argument("--bbt-budget", type=int, default=10, help="BBT evaluations (paper: 8000)")
    p.add_argument("--bbt-popsize", type=int, default=5, help="CMA-ES population (paper: 20)")
    p.add_argument("--bbt-tokens", type=int, default=10, help="soft-prompt tokens n (paper: 50)")
    p.add_argument("--bbt-dim", type=int, default=500, help="intrinsic dimension d (paper: 500)")
    p.add_argument(
        "--search-iters", type=int, default=2, help="prompt-search iterations (GrIPS: 10)"
    )
    p.add_argument(
        "--search-candidates", type=int, default=2, help="candidates per step (GrIPS: 5)"
    )
    p.add_argument("--search-demos", type=int, default=0, help="demonstrations in the prompt")
    p.add_argument("--mezo-steps", type=int, default=4, help="MeZO steps (paper: 100k)")
    p.add_argument("--mezo-lr", type=float, default=1e-6)
    p.add_argument("--load-seconds", type=float, default=8.0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (busy shared CPU: 1 is fastest)"
    )
    p.add_argument("--skip", default="", help="comma list of parts to skip: tune,load,memory")
    return p.parse_args()


def test_subset(data, per_class: int) -> tuple[list[str], torch.Tensor]:
    """The first `per_class` test articles of each class (fixed, no seed)."""
    if per_class <= 0:
        return list(data.test_texts), data.y_test
    idx = [
        i
        for c in range(len(data.classes))
        for i in (data.y_test == c).nonzero().flatten()[:per_class].tolist()
    ]
    return [data.test_texts[i] for i in idx], data.y_test[idx]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def tune_rows(a, lm, data, verb, url) -> list[dict]:
    """One row per (method, seed): accuracy on the test subset, API calls, wall time."""
    test_x, test_y = test_subset(data, a.test_per_class)
    rows = []
    for seed in range(a.seeds):
        train_x, train_y = few_shot(data, a.shots, seed)
        train = (train_x, train_y, test_x, test_y, seed)
        runs = [partial(_zero_shot, url, verb, test_x, test_y, seed), partial(_bbt, a, url, verb, *train),
                partial(_search, a, url, verb, *train), partial(_mezo, a, verb, *train),
                partial(dict, method="LoRA (hook: tuning/lora, other engineer)", seed=seed, acc=None)]  # fmt: skip
        for run in runs:
            rows.append(run())
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _zero_shot(url, verb, test_x, test_y, seed) -> dict:
    h = RemoteModel(url, access="scores")
    acc, t = timed(lambda: accuracy(class_scores(h, test_x, verb), test_y))
    return {
        "method": "manual prompt, zero-shot",
        "seed": seed,
        "acc": acc,
        "calls": h.calls,
        "train_calls": 0,
        "s": round(t, 1),
    }


def _bbt(a, url, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    h = RemoteModel(url, access="embeddings", chunk=32)
    cfg = BBTConfig(
        budget=a.bbt_budget, intrinsic_dim=a.bbt_dim, n_tokens=a.bbt_tokens, popsize=a.bbt_popsize
    )
    res, t = timed(lambda: bbt(h, train_x, train_y, verb, cfg, seed))
    train_calls = h.calls
    acc = accuracy(class_scores_bbt(h, res.prompt, test_x, verb), test_y)
    return {"method": f"BBT (n={a.bbt_tokens}, d={a.bbt_dim}, {res.evaluations} evals)", "seed": seed, "acc": acc,
            "calls": h.calls, "train_calls": train_calls, "s": round(t, 1),
            "loss": [round(res.start_loss, 4), round(res.best_loss, 4)]}  # fmt: skip


def _search(a, url, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    h = RemoteModel(url, access="scores")
    cfg = PromptSearchConfig(
        iterations=a.search_iters, candidates=a.search_candidates, n_demos=a.search_demos
    )
    res, t = timed(lambda: prompt_search(h, train_x, train_y, verb, cfg, seed))
    train_calls = h.calls
    acc = accuracy(class_scores(h, test_x, res.verbalizer), test_y)
    return {"method": f"prompt search ({res.evaluations} candidates)", "seed": seed, "acc": acc,
            "calls": h.calls, "train_calls": train_calls, "s": round(t, 1),
            "score": [round(res.start_score, 4), round(res.best_score, 4)]}  # fmt: skip


def _mezo(a, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    lm = load_model("smollm2-135m")  # a fresh copy: MeZO writes the weights
    loss = label_loss_fn(lm, train_x, train_y, verb)
    start = loss()
    _hist, t = timed(lambda: mezo(lm, loss, MeZOConfig(steps=a.mezo_steps, lr=a.mezo_lr), seed))
    acc = accuracy(class_scores(narrow(lm, "scores"), test_x, verb), test_y)
    return {"method": f"MeZO white-box ({a.mezo_steps} steps, lr {a.mezo_lr})", "seed": seed, "acc": acc,
            "calls": 0, "train_calls": 0, "s": round(t, 1), "loss": [round(start, 4), round(loss(), 4)]}  # fmt: skip


def load_test(lm, seconds: float, max_batch: int, clients: int = 32) -> dict:
    """`clients` threads each sending one scoring request at a time for `seconds`."""
    app = build_app(Backend(lm, "scores"), ServeSettings(max_batch=max_batch, max_wait_ms=5))
    lat, fails, lock = [], [0], threading.Lock()
    with running(app) as url:
        stop = time.monotonic() + seconds

        def client(i: int) -> None:
            h, n = RemoteModel(url, access="scores", retries=0), 0
            while time.monotonic() < stop:  # bounded by time
                t = time.perf_counter()
                try:
                    h.score([f"Request {i}-{n}: the capital of France is"], [" Paris"])
                    with lock:
                        lat.append(time.perf_counter() - t)
                except Exception:
                    with lock:
                        fails[0] += 1
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        [th.start() for th in threads]
        [th.join() for th in threads]
        wall = time.perf_counter() - t0
        passes = app.state.batcher.stats.passes
    lat.sort()
    return {"max_batch": max_batch, "ok": len(lat), "failed": fails[0], "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
            "forward_passes": passes, "mean_batch": round(len(lat) / max(passes, 1), 2)}  # fmt: skip


CHILD = """
import resource, sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, "src")
from lfm.assets import load_model
from lfm.tuning.mezo import MeZOConfig, mezo
lm = load_model("smollm2-135m")
enc = lm._batch(["The quick brown fox jumps over the lazy dog. " * 8] * 4, side="right")
def loss():
    return float(lm.model(**enc, labels=enc["input_ids"]).loss)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if "{mode}" == "mezo":
    mezo(lm, loss, MeZOConfig(steps=2))
else:
    lm.model.train()
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-5)
    for _ in range(2):
        lm.model(**enc, labels=enc["input_ids"]).loss.backward(); opt.step(); opt.zero_grad()
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(threads: int) -> dict:
    """Peak RSS (MiB) after loading, and after 2 steps, in a fresh child per mode."""
    out = {}
    for mode in ("mezo", "full-ft-adamw"):
        res = subprocess.run([sys.executable, "-c", CHILD.format(mode=mode, threads=threads)], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)  # fmt: skip
        base, peak = (int(v) // 1024 for v in res.stdout.split()[-2:])
        out[mode] = {"after_load_mib": base, "peak_mib": peak, "step_overhead_mib": peak - base}
    return out


def main() -> None:
    a = args_()
    torch.set_num_threads(a.threads)
    skip = set(a.skip.split(","))
    lm, data = load_model("smollm2-135m"), load_dataset("bbc-news")
    verb = Verbalizer(BBC_TEMPLATE, tuple(BBC_LABEL_WORDS[c] for c in data.classes), a.max_chars)
    print(
        f"# shots={a.shots}/class, test={a.test_per_class or 'all'}/class, seeds={a.seeds}, max_chars={a.max_chars}"
    )
    if "tune" not in skip:
        with running(build_app(Backend(lm, "embeddings"), ServeSettings(max_batch=32))) as url:
            rows = tune_rows(a, lm, data, verb, url)
        summary(rows)
    if "load" not in skip:
        batched, single = load_test(lm, a.load_seconds, 32), load_test(lm, a.load_seconds, 1)
        print(json.dumps(batched), json.dumps(single), sep="\n")
        print(
            f"throughput ratio batched/one-at-a-time: {batched['req_per_s'] / single['req_per_s']:.2f}x"
        )
    if "memory" not in skip:
        mem = memory(a.threads)
        print(json.dumps(mem))
        print(
            f"step overhead MeZO / full FT: {mem['mezo']['step_overhead_mib']} / {mem['full-ft-adamw']['step_overhead_mib']} MiB"
        )


def summary(rows: list[dict]) -> None:
    print(f"\n{'method':<48} {'acc mean':>8} {'calls':>7} {'s':>7}")
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name and r.get("acc") is not None]
        if not rs:
            print(f"{name:<48} {'—':>8}")
            continue
        print(f"{name:<48} {statistics.mean(r['acc'] for r in rs):8.3f} "
              f"{statistics.mean(r['calls'] for r in rs):7.0f} {statistics.mean(r['s'] for r in rs):7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
