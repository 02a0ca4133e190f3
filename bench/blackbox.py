"""Benchmark: black-box tuning of SmolLM2-135M behind `lfm serve`, retrieval perplexity, the server.

1. `tune`: BBC News few-shot (`--shots` per class from the train split, a fixed held-out subset of
   `--test-per-class` test articles per class): manual-prompt zero-shot, BBT (EMBEDDINGS) and
   GrIPS-style prompt search (SCORES) through `RemoteModel` against a real `lfm serve` process on
   127.0.0.1, and white-box LoRA and MeZO for reference; test accuracy, API calls and wall time.
2. `ppl`: perplexity of held-out BBC text (continuation after a prefix) with and without retrieval:
   kNN-LM (datastore of BBC training articles, HIDDEN) and REPLUG (documents = the same training
   articles retrieved with minilm-l6, SCORES).
3. `memory`: peak RSS (child ru_maxrss) of MeZO, LoRA and full fine-tuning (AdamW) steps.
4. `load`: 32 concurrent clients, dynamic batching vs one request at a time.

Defaults are the protocol cut to what a shared 2-core CPU gives in an hour (1 thread): 16 shots,
50 held-out articles, 3 seeds, BBT 8 evaluations, prompt search 3 candidates, LoRA 2 epochs, MeZO 2
steps; one seed's `tune` is ~4 CPU-minutes for BBT + search. Seeds run as separate processes:
    .venv/bin/python bench/blackbox.py --parts ppl
    .venv/bin/python bench/blackbox.py --parts tune --seeds 1 --first-seed 0   # and 1, 2
    .venv/bin/python bench/blackbox.py --parts memory
The papers' protocol (hours on a GPU):
    .venv/bin/python bench/blackbox.py --test-per-class 0 --max-chars 1200 --bbt-budget 8000 \
        --bbt-tokens 50 --bbt-popsize 20 --search-iters 10 --search-candidates 5 --search-demos 1 \
        --mezo-steps 100000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
from peft import TaskType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lfm.access import narrow
from lfm.assets import load_dataset, load_model
from lfm.serve import Backend, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import free_port, running, wait_healthy
from lfm.tuning.adapters import inject
from lfm.tuning.bbt import BBTConfig, bbt
from lfm.tuning.mezo import MeZOConfig, mezo
from lfm.tuning.peft_methods import LoraConfig
from lfm.tuning.prompt_search import PromptSearchConfig, prompt_search
from lfm.tuning.retrieval import (
    ReplugConfig,
    build_datastore,
    interpolate,
    knn_target_probs,
    minilm_embedder,
    replug_score,
    token_queries,
)
from lfm.tuning.tasks import (
    BBC_LABEL_WORDS,
    BBC_TEMPLATE,
    TextClassification,
    Verbalizer,
    accuracy,
    class_scores,
    few_shot,
    held_out,
)

ROOT = Path(__file__).resolve().parents[1]


def args_() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--parts", default="tune,ppl,memory", help="comma list of tune,ppl,memory,load")
    add("--shots", type=int, default=16, help="train examples per class (paper: 16)")
    add("--test-per-class", type=int, default=10, help="held-out test articles per class (0: all)")
    add("--seeds", type=int, default=3)
    add("--methods", default="zero-shot,bbt,search,lora,mezo", help="columns of `tune` to run")
    add("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1")
    add("--max-chars", type=int, default=200, help="article cut (tasks default: 1200)")
    add("--bbt-budget", type=int, default=8, help="BBT evaluations = API calls (paper: 8000)")
    add("--bbt-popsize", type=int, default=4, help="CMA-ES population (paper: 20)")
    add("--bbt-tokens", type=int, default=10, help="soft-prompt tokens n (paper: 50)")
    add("--bbt-dim", type=int, default=500, help="intrinsic dimension d (paper: 500)")
    add("--search-iters", type=int, default=1, help="prompt-search iterations (GrIPS: 10)")
    add("--search-candidates", type=int, default=2, help="candidates per step (GrIPS: 5)")
    add("--search-demos", type=int, default=0, help="demonstrations in the prompt")
    add("--mezo-steps", type=int, default=2, help="MeZO steps (paper: 100k)")
    add("--mezo-lr", type=float, default=1e-6)
    add("--lora-epochs", type=int, default=2)
    add("--lora-lr", type=float, default=1e-3)
    add("--ppl-store", type=int, default=100, help="BBC training articles in the datastore")
    add("--ppl-test", type=int, default=15, help="held-out test articles scored")
    add("--ppl-chars", type=int, default=800, help="characters kept of each article")
    add("--ppl-prefix", type=int, default=200, help="prefix (retrieval query) length in chars")
    add("--knn-k", type=int, default=1024, help="kNN-LM neighbours (paper: 1024)")
    add("--replug-k", type=int, default=4, help="REPLUG documents (paper: 10)")
    add("--replug-chars", type=int, default=400, help="characters of each retrieved document")
    add("--load-seconds", type=float, default=8.0)
    add("--threads", type=int, default=1, help="torch threads (busy shared CPU: 1 is fastest)")
    return p.parse_args()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def tune_rows(a, data, verb, url) -> list[dict]:
    """One row per (method, seed): accuracy on the held-out subset, API calls, wall time."""
    test_x, test_y = held_out(data, a.test_per_class)
    chosen, rows = a.methods.split(","), []
    if "zero-shot" in chosen:  # no training, no seed: run once
        rows.append(_zero_shot(url, verb, test_x, test_y))
        print(json.dumps(rows[-1]), flush=True)
    runs = {"bbt": partial(_bbt, a, url), "search": partial(_search, a, url),
            "lora": partial(_lora, a), "mezo": partial(_mezo, a)}  # fmt: skip
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        train = (*few_shot(data, a.shots, seed), test_x, test_y, seed)
        for run in [runs[m] for m in runs if m in chosen]:
            rows.append(run(verb, *train))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def remote(url: str, access: str) -> RemoteModel:
    # chunk above the train set: one BBT evaluation is one HTTP call, as in the paper's count
    return RemoteModel(url, access=access, chunk=512, timeout=1200.0)


def _zero_shot(url, verb, test_x, test_y) -> dict:
    h = remote(url, "scores")
    acc, t = timed(lambda: accuracy(class_scores(h, test_x, verb), test_y))
    return {"method": "manual prompt, zero-shot", "seed": None, "acc": acc, "calls": h.calls,
            "train_calls": 0, "s": round(t, 1)}  # fmt: skip


def _bbt(a, url, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    h = remote(url, "embeddings")
    cfg = BBTConfig(budget=a.bbt_budget, intrinsic_dim=a.bbt_dim, n_tokens=a.bbt_tokens,
                    popsize=a.bbt_popsize)  # fmt: skip
    task = TextClassification(train_x, train_y, verb)
    res, t = timed(lambda: bbt(h, task, cfg, seed=seed))
    train_calls = h.calls
    acc = accuracy(res.scores(h, test_x), test_y)
    return {"method": f"BBT (n={a.bbt_tokens}, d={a.bbt_dim}, popsize {a.bbt_popsize})", "seed": seed,
            "acc": acc, "evaluations": res.evaluations, "calls": h.calls, "train_calls": train_calls,
            "s": round(t, 1), "loss": [round(res.start_loss, 4), round(res.best_loss, 4)]}  # fmt: skip


def _search(a, url, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    h = remote(url, "scores")
    cfg = PromptSearchConfig(iterations=a.search_iters, candidates=a.search_candidates,
                             n_demos=a.search_demos)  # fmt: skip
    task = TextClassification(train_x, train_y, verb)
    res, t = timed(lambda: prompt_search(h, task, cfg, seed=seed))
    train_calls = h.calls
    acc = accuracy(res.scores(h, test_x), test_y)
    return {"method": f"prompt search ({a.search_iters} it. x {a.search_candidates} cand.)", "seed": seed,
            "acc": acc, "evaluations": res.evaluations, "calls": h.calls, "train_calls": train_calls,
            "s": round(t, 1), "score": [round(res.start_score, 4), round(res.best_score, 4)]}  # fmt: skip


def _mezo(a, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    lm = load_model("smollm2-135m")  # a fresh copy: MeZO writes the weights (here, in place)
    cfg = MeZOConfig(steps=a.mezo_steps, lr=a.mezo_lr)
    task = TextClassification(train_x, train_y, verb)
    res, t = timed(lambda: mezo(lm, task, cfg, seed=seed, inplace=True))
    acc = accuracy(class_scores(narrow(lm, "scores"), test_x, verb), test_y)
    loss = [round(res.metrics["start_loss"], 4), round(res.metrics["loss"], 4)]
    return {"method": f"MeZO white-box ({a.mezo_steps} steps, lr {a.mezo_lr})", "seed": seed, "acc": acc,
            "calls": 0, "train_calls": 0, "s": round(t, 1), "loss": loss}  # fmt: skip


def lora_train(
    lm, texts, y, verb, epochs: int, lr: float, seed: int, batch: int = 8
) -> list[float]:
    """LoRA (r 8, q/v, no dropout) with AdamW on the label-word CE at the last position."""
    torch.manual_seed(seed)  # the LoRA init and the batch order below draw from it
    cfg = LoraConfig(r=8, alpha=16, dropout=0.0, lr=lr).to_peft(TaskType.CAUSAL_LM)
    peft = inject(lm.model, cfg)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([lm.encode(f" {w}")[0] for w in verb.label_words])
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(texts)).split(batch):
            enc = lm._batch([verb.prompt(texts[i]) for i in idx], side="left")
            logits = peft(**enc, logits_to_keep=1).logits[:, -1, ids].float()
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    lm.model = peft.merge_and_unload().eval()
    return losses


def _lora(a, verb, train_x, train_y, test_x, test_y, seed) -> dict:
    lm = load_model("smollm2-135m")
    losses, t = timed(
        lambda: lora_train(lm, train_x, train_y, verb, a.lora_epochs, a.lora_lr, seed)
    )
    acc = accuracy(class_scores(narrow(lm, "scores"), test_x, verb), test_y)
    return {"method": f"LoRA white-box (r 8, {a.lora_epochs} epochs, lr {a.lora_lr})", "seed": seed,
            "acc": acc, "calls": 0, "train_calls": 0, "s": round(t, 1),
            "loss": [round(losses[0], 4), round(losses[-1], 4)]}  # fmt: skip


def serve_process(threads: int, timeout_s: float = 1200.0):
    """`lfm serve --model smollm2-135m --access embeddings` on 127.0.0.1 as a child process; (proc, url)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "lfm", "serve", "--model", "smollm2-135m", "--access", "embeddings",
           "--port", str(port), "--timeout-s", str(timeout_s)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def ppl_rows(a, lm, data) -> dict:
    """Perplexity of held-out continuations: the LM alone, kNN-LM (grid of k, T, λ) and REPLUG."""
    test = [t[: a.ppl_chars] for t in data.test_texts[: a.ppl_test]]
    heads = {t[:100] for t in test}  # a training article that repeats a test one stays out
    store_texts = [t[: a.ppl_chars] for t in data.train_texts if t[:100] not in heads][
        : a.ppl_store
    ]
    cut = [t.rfind(" ", 0, a.ppl_prefix) for t in test]
    prefixes, conts = (
        [t[:c] for t, c in zip(test, cut, strict=True)],
        [t[c:] for t, c in zip(test, cut, strict=True)],
    )
    h = narrow(lm, "hidden")
    store, t_store = timed(lambda: build_datastore(h, store_texts))
    qs, lms, tgts = [], [], []
    for x, y in zip(prefixes, conts, strict=True):
        q, lp, ids = token_queries(h, x + y, store.module)
        skip = len(h.encode(x + y)) - len(ids)  # 1 without BOS: entry j predicts token j + skip
        keep = len(h.encode(x)) - skip  # the entries that predict the continuation's tokens
        qs.append(q[keep:]), lms.append(lp[keep:]), tgts.append(ids[keep:])
    q, lp, tgt = torch.cat(qs), torch.cat(lms), torch.cat(tgts)
    out = {"store_entries": len(store.values), "store_s": round(t_store, 1), "tokens": len(tgt),
           "lm_ppl": round(math.exp(-float(lp.mean())), 3), "knn": []}  # fmt: skip
    nn = torch.cat([torch.cdist(c, store.keys).min(1).values for c in q.split(256)])
    out["nn_d2_median"] = round(float(nn.square().median()), 1)  # the scale T meets
    for k in sorted({a.knn_k, 64, 8}, reverse=True):
        for temp in (1.0, 10.0, 100.0, 1000.0):
            p = knn_target_probs(q, tgt, store, k, temp)
            for lam in (0.1, 0.25, 0.5):
                ppl = math.exp(-float(interpolate(lp, p, lam).mean()))
                out["knn"].append({"k": k, "T": temp, "lam": lam, "ppl": round(ppl, 3)})
    out["replug"] = replug_ppl(a, lm, prefixes, conts, store_texts)
    return out


def replug_ppl(a, lm, prefixes, conts, docs) -> dict:
    h, embed = narrow(lm, "scores"), minilm_embedder()
    n = sum(len(h.encode(x + y)) - len(h.encode(x)) for x, y in zip(prefixes, conts, strict=True))
    base = float(h.score(prefixes, conts).sum())
    cfg = ReplugConfig(k=a.replug_k, doc_chars=a.replug_chars)
    rep, t = timed(lambda: float(replug_score(h, prefixes, conts, docs, embed, cfg).sum()))
    return {"k": cfg.k, "doc_chars": cfg.doc_chars, "tokens": n, "s": round(t, 1),
            "lm_ppl": round(math.exp(-base / n), 3), "replug_ppl": round(math.exp(-rep / n), 3)}  # fmt: skip


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
from lfm.tuning.mezo import MeZOConfig, zero_order
lm = load_model("smollm2-135m")
enc = lm._batch(["The quick brown fox jumps over the lazy dog. " * 8] * 4, side="right")
def loss():
    return float(lm.model(**enc, labels=enc["input_ids"]).loss)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if "{mode}" == "mezo":
    zero_order(lm.model, loss, MeZOConfig(steps=2))
else:
    model = lm.model
    if "{mode}" == "lora":
        from peft import TaskType
        from lfm.tuning.adapters import inject
        from lfm.tuning.peft_methods import LoraConfig
        model = inject(lm.model, LoraConfig(dropout=0.0).to_peft(TaskType.CAUSAL_LM))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(2):
        model(**enc, labels=enc["input_ids"]).loss.backward(); opt.step(); opt.zero_grad()
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(threads: int) -> dict:
    """Peak RSS (MiB) after loading, and after 2 steps, in a fresh child per mode."""
    out = {}
    for mode in ("mezo", "lora", "full-ft-adamw"):
        res = subprocess.run([sys.executable, "-c", CHILD.format(mode=mode, threads=threads)], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)  # fmt: skip
        base, peak = (int(v) // 1024 for v in res.stdout.split()[-2:])
        out[mode] = {"after_load_mib": base, "peak_mib": peak, "step_overhead_mib": peak - base}
    return out


def main() -> None:
    a = args_()
    torch.set_num_threads(a.threads)
    parts = set(a.parts.split(","))
    data = load_dataset("bbc-news")
    lm = load_model("smollm2-135m") if parts & {"ppl", "load"} else None  # the server loads its own
    verb = Verbalizer(BBC_TEMPLATE, tuple(BBC_LABEL_WORDS[c] for c in data.classes), a.max_chars)
    print(f"# {vars(a)}", flush=True)
    if "ppl" in parts:
        print(json.dumps({"ppl": ppl_rows(a, lm, data)}), flush=True)
    if "tune" in parts and not {"zero-shot", "bbt", "search"} & set(a.methods.split(",")):
        summary(tune_rows(a, data, verb, url=""))  # white-box columns only: no server
    elif "tune" in parts:
        proc, url = serve_process(a.threads)
        try:
            rows = tune_rows(a, data, verb, url)
        finally:
            proc.terminate()
            proc.wait(30)
        summary(rows)
    if "load" in parts:
        batched, single = load_test(lm, a.load_seconds, 32), load_test(lm, a.load_seconds, 1)
        print(json.dumps(batched), json.dumps(single), sep="\n")
        ratio = batched["req_per_s"] / single["req_per_s"]
        print(f"throughput ratio batched/one-at-a-time: {ratio:.2f}x")
    if "memory" in parts:
        mem = memory(a.threads)
        print(json.dumps(mem))
        print("peak RSS MeZO / LoRA / full FT: " + " / ".join(
            f"{mem[m]['peak_mib']} MiB" for m in ("mezo", "lora", "full-ft-adamw")))  # fmt: skip


def summary(rows: list[dict]) -> None:
    print(f"\n{'method':<52} {'acc mean ± sd':>14} {'calls':>6} {'s':>7}")
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        accs = [r["acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name:<52} {statistics.mean(accs):7.3f} ± {sd:4.3f} "
              f"{statistics.mean(r['calls'] for r in rs):6.0f} {statistics.mean(r['s'] for r in rs):7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
