"""Benchmark: the throughput of the edit statistics pass against bare forward passes, and what a
smaller statistics budget costs a ROME edit.

    .venv/bin/python bench/edit_stats.py --tokens 20000 --rounds 5 --threads 1
    .venv/bin/python bench/edit_stats.py --rounds 0 --budgets 1000 2000 5000 20000 100000 --facts 20

Throughput (`--rounds` interleaved rounds, each over the same `--tokens` tokens of the BBC
training articles, one article per pass, cut to `--max-len`; medians):

- full: the model's forward pass, nothing else (a statistics pass that runs the whole model);
- to layer: the forward pass stopped after the edited layer's MLP output projection, the least
  any statistics pass must run;
- statistics: `lfm.edit.stats.compute_second_moments`, the pass ROME, MEMIT and AlphaEdit use
  (the same stop, the keys captured and Σ k kᵀ accumulated in float64).

The ratios are statistics / full and statistics / to layer, in tokens per second.

Budgets (`--budgets`): C computed afresh (not read from the cache) from each budget, then ROME
on the first `--facts` facts the model knows, each edit evaluated (efficacy, paraphrase,
neighbourhood, Score) and reverted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lfm.assets import load_dataset, load_model
from lfm.core.hooks import stop_after
from lfm.edit.common import stats_args
from lfm.edit.facts import evaluate_fact, known_facts, load_facts, summarise
from lfm.edit.site import default_layer, edit_sites
from lfm.edit.stats import compute_second_moments
from lfm.errors import LfmError
from lfm.registry import get


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens per throughput pass")
    p.add_argument("--max-len", type=int, default=256, help="longest piece of one article")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (0: none)")
    p.add_argument("--budgets", type=int, nargs="*", default=[], help="statistics token budgets")
    p.add_argument("--facts", type=int, default=20, help="ROME edits per budget")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def _pieces(tok, texts, tokens: int, max_len: int) -> list[torch.Tensor]:
    """The token rows a statistics pass over `tokens` tokens reads, tokenised once."""
    out, seen = [], 0
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
        ids = ids[:, : tokens - seen]
        out.append(ids)
        seen += ids.shape[1]
        if seen >= tokens:
            break
    return out


@torch.no_grad()
def _full(model, rows: list[torch.Tensor]) -> None:
    for ids in rows:
        model(input_ids=ids)


@torch.no_grad()
def _to_layer(model, module: str, rows: list[torch.Tensor]) -> None:
    with stop_after(model, [module]) as run:
        for ids in rows:
            run(lambda ids=ids: model(input_ids=ids))


def _rate(fn: Callable[[], object], tokens: int) -> float:
    t0 = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - t0)


def throughput(a, handle, texts) -> None:
    model, tok = handle.model, handle.tokenizer
    layer = default_layer(model)
    module = edit_sites(model, [layer])[0].module
    rows = _pieces(tok, texts, a.tokens, a.max_len)
    n = sum(r.shape[1] for r in rows)

    def stats() -> None:
        compute_second_moments(model, tok, [layer], texts, a.tokens, a.max_len)

    runs = {"full": lambda: _full(model, rows), "to layer": lambda: _to_layer(model, module, rows),
            "statistics": stats}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in runs}
    _full(model, rows[:2])  # warm
    for r in range(a.rounds):
        for name, fn in runs.items():
            rates[name].append(_rate(fn, n))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in rates.items()),
              flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{a.model}, layer {layer} of {model.config.num_hidden_layers}, {n:,} tokens in "
          f"{len(rows)} passes, {torch.get_num_threads()} thread(s), medians of {a.rounds}:")  # fmt: skip
    print("| pass | tokens/s | statistics / this |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {med['statistics'] / v:.2f} |")
    per = sorted(s / t for s, t in zip(rates["statistics"], rates["to layer"], strict=True))
    print(f"statistics / to layer, round by round: median {statistics.median(per):.2f} "
          f"({per[0]:.2f}–{per[-1]:.2f})")  # fmt: skip


def budgets(a, handle, texts) -> None:
    layer = default_layer(handle.model)
    facts = known_facts(handle, load_facts())[: a.facts]
    spec = get("edit/rome")
    print(f"\nROME on {len(facts)} known facts, C at layer {layer} from each budget:")
    print("| statistics tokens | C s | efficacy | paraphrase | neighbourhood | Score |")
    print("|---|---|---|---|---|---|")
    for budget in a.budgets:
        cfg = spec.config(stats_tokens=budget)
        try:  # the library's own floor: C needs at least D_in tokens to have full rank
            stats_args(cfg, edit_sites(handle.model, [layer]))
        except LfmError as e:
            print(f"| {budget:,} | refused: {e} | | | | |")
            continue
        t0 = time.perf_counter()
        cov = compute_second_moments(handle.model, handle.tokenizer, [layer], texts, budget,
                                     a.max_len)[layer]  # fmt: skip
        secs = time.perf_counter() - t0
        rows = []
        for f in facts:
            undo = spec.fn(handle, f.request, cfg, cov=cov).apply(handle.model)
            rows.append(evaluate_fact(handle, f))
            undo.revert(handle.model)
        m = summarise(rows)
        print(f"| {budget:,} | {secs:.1f} | {m['efficacy']:.1f} | {m['paraphrase']:.1f} | "
              f"{m['neighbourhood']:.1f} | {m['score']:.1f} |", flush=True)  # fmt: skip


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    handle = load_model(a.model)
    texts = load_dataset("bbc-news").train_texts
    if a.rounds:
        throughput(a, handle, texts)
    if a.budgets:
        budgets(a, handle, texts)


if __name__ == "__main__":
    main()
