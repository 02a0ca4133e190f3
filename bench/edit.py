"""Benchmark: ROME, MEMIT, AlphaEdit and FT-L on facts the model knows (CounterFact protocol).

    .venv/bin/python bench/edit.py --model smollm2-135m --n 100 --methods rome memit ft-l
    .venv/bin/python bench/edit.py --n 10 --gen-tokens 0        # quick

Single edits: each method edits one fact, is evaluated (efficacy, paraphrase, neighbourhood,
Score, generation, fluency) and reverted bit for bit. Then MEMIT edits all n facts in one batch.
The covariance statistics are built once per layer (and cached) and their time is reported.
"""

from __future__ import annotations

import argparse
import time

import torch


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=100, help="known facts to edit")
    p.add_argument("--methods", nargs="+", default=["rome", "memit", "ft-l"])
    p.add_argument("--gen-tokens", type=int, default=20, help="0 skips generation and fluency")
    p.add_argument("--batch", action="store_true", help="also MEMIT with all n edits at once")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stats-tokens", type=int, default=100_000, help="token budget for C")
    p.add_argument(
        "--full-passes", action="store_true",
        help="δ search by full forward passes (tail_only=False, the reference path) for timing",
    )  # fmt: skip
    return p.parse_args()


def _stats(handle, methods, tokens: int) -> float:
    from lfm.edit import common
    from lfm.edit.memit import edit_layers
    from lfm.edit.stats import second_moments

    layers = {common.default_layer(handle.model)}
    if {"memit", "alphaedit"} & set(methods):
        layers |= set(edit_layers(handle.model, None))
    t = time.perf_counter()
    second_moments(handle.model, handle.tokenizer, sorted(layers), tokens=tokens)
    return time.perf_counter() - t


def _cfg(name: str, tokens: int, full: bool = False):
    from lfm.registry import get

    fields = get(f"edit/{name}").config.model_fields
    kw = {"stats_tokens": tokens} if "stats_tokens" in fields else {}
    if "tail_only" in fields:
        kw["tail_only"] = not full
    return get(f"edit/{name}").config(**kw)


def _single(handle, facts, name: str, a: argparse.Namespace) -> tuple[dict[str, float], float]:
    from lfm.edit.facts import evaluate_fact, summarise
    from lfm.registry import get

    cfg = _cfg(name, a.stats_tokens, a.full_passes)
    fn, rows, secs = get(f"edit/{name}").fn, [], 0.0
    for f in facts:
        t = time.perf_counter()
        patch = fn(handle, f.request, cfg)
        secs += time.perf_counter() - t
        undo = patch.apply(handle.model)
        rows.append(evaluate_fact(handle, f, gen_tokens=a.gen_tokens))
        undo.revert(handle.model)
    return summarise(rows), secs / len(facts)


def _batch(handle, facts, a: argparse.Namespace) -> tuple[dict[str, float], float]:
    from lfm.edit import memit
    from lfm.edit.facts import evaluate_fact, summarise

    t = time.perf_counter()
    patch = memit(handle, [f.request for f in facts], _cfg("memit", a.stats_tokens, a.full_passes))
    secs = time.perf_counter() - t
    undo = patch.apply(handle.model)
    rows = [evaluate_fact(handle, f, gen_tokens=a.gen_tokens) for f in facts]
    undo.revert(handle.model)
    return summarise(rows), secs


def _row(label: str, m: dict[str, float], secs: float) -> str:
    cols = ("efficacy", "paraphrase", "neighbourhood", "score", "generation", "fluency")
    vals = " ".join(f"{m[c]:8.1f}" if c in m else f"{'-':>8}" for c in cols)
    return f"{label:<22}{vals} {secs:9.2f}"


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    from lfm.assets import load_model
    from lfm.edit.facts import evaluate_fact, known_facts, load_facts, summarise

    handle = load_model(a.model)
    facts = load_facts()
    known = known_facts(handle, facts)
    use = known[: a.n]
    print(f"{a.model}: knows {len(known)} of {len(facts)} facts; editing {len(use)}", flush=True)
    print(
        f"covariance statistics (built once, cached): {_stats(handle, a.methods, a.stats_tokens):.1f} s",
        flush=True,
    )
    head = ("efficacy", "paraphr", "neighb", "Score", "gen", "fluency", "s/edit")
    print(f"{'method':<22}" + " ".join(f"{h:>8}" for h in head))
    base = summarise([evaluate_fact(handle, f, gen_tokens=a.gen_tokens) for f in use])
    print(_row("unedited", base, 0.0), flush=True)
    for name in a.methods:
        print(_row(name, *_single(handle, use, name, a)), flush=True)
    if a.batch:
        m, secs = _batch(handle, use, a)
        print(_row(f"memit batch of {len(use)}", m, secs) + " (total s)")


if __name__ == "__main__":
    main()
