"""Benchmark: ROME, MEMIT, AlphaEdit and FT-L on facts the model knows (CounterFact protocol).

    .venv/bin/python bench/edit.py --model smollm2-135m --n 100 --methods rome memit ft_l
    .venv/bin/python bench/edit.py --n 10 --gen-tokens 0        # quick
    .venv/bin/python bench/edit.py --n 100 --methods --batch     # MEMIT, one batch of 100
    .venv/bin/python bench/edit.py --n 100 --methods --sequential rome alphaedit

Single edits: each method edits one fact, is evaluated (efficacy, paraphrase, neighbourhood,
Score, generation, fluency) and reverted bit for bit. `--batch`: MEMIT edits all n facts in one
batch. `--sequential`: the n edits are applied one after another (AlphaEdit carrying its state)
and all are evaluated at the end. With several edits at once, neighbourhood prompts naming an
edited subject are left out (`facts.neighbours`); the row "all neighbours" keeps them.
The covariance statistics are built once per layer (and cached) and their time is reported.
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm.core.measure import Measured, Meter, total


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=100, help="known facts to edit")
    p.add_argument(
        "--methods", nargs="*", default=["rome", "memit", "ft_l"],
        help="registered editors (`lfm methods`): rome, memit, alphaedit, ft_l",
    )  # fmt: skip
    p.add_argument("--sequential", nargs="*", default=[], help="e.g. rome alphaedit")
    p.add_argument("--gen-tokens", type=int, default=20, help="0 skips generation and fluency")
    p.add_argument("--batch", action="store_true", help="also MEMIT with all n edits at once")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--record", action="store_true",
        help="write each single-edit row into lfm's measured table (read by `lfm plan --task edit`)",
    )  # fmt: skip
    p.add_argument("--stats-tokens", type=int, default=100_000, help="token budget for C")
    p.add_argument(
        "--key-constraint", choices=["each", "mean"], default=None,
        help="ROME/MEMIT/AlphaEdit: constrain every prefixed key (default) or only their mean",
    )  # fmt: skip
    p.add_argument(
        "--v-lr", type=float, default=None,
        help="Adam learning rate of the δ search (default: the method's, the paper's 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--stop-nll", type=float, default=None,
        help="end the δ search once the target NLL is below this (default: the method's)",
    )  # fmt: skip
    p.add_argument(
        "--layers", type=int, nargs="+", default=None,
        help="MEMIT/AlphaEdit: the edited blocks (default: the config's window)",
    )  # fmt: skip
    p.add_argument(
        "--full-passes", action="store_true",
        help="δ search by full forward passes (tail_only=False, the reference path) for timing",
    )  # fmt: skip
    a = p.parse_args()
    a.methods = [_name(m) for m in a.methods]  # one spelling: the registry's (ft-l is ft_l)
    a.sequential = [_name(m) for m in a.sequential]
    return a


def _name(method: str) -> str:
    from lfm.registry import get

    return get(method, area="edit").name


def _stats(handle, methods, a: argparse.Namespace) -> tuple[float, float]:
    from lfm.edit.memit import edit_layers
    from lfm.edit.site import default_layer
    from lfm.edit.stats import second_moments

    layers = {default_layer(handle.model)}
    if {"memit", "alphaedit", "batch"} & set(methods):
        layers |= set(edit_layers(handle.model, a.layers))
    clock = _Clock()
    with clock:
        second_moments(handle.model, handle.tokenizer, sorted(layers), tokens=a.stats_tokens)
    return clock.per(1)


def _cfg(name: str, a: argparse.Namespace):
    from lfm.registry import get

    fields = get(f"edit/{name}").config.model_fields
    kw = {"stats_tokens": a.stats_tokens} if "stats_tokens" in fields else {}
    if "tail_only" in fields:
        kw["tail_only"] = not a.full_passes
    if "key_constraint" in fields and a.key_constraint:
        kw["key_constraint"] = a.key_constraint
    if "v_lr" in fields and a.v_lr is not None:
        kw["v_lr"] = a.v_lr
    if "stop_nll" in fields and a.stop_nll is not None:
        kw["stop_nll"] = a.stop_nll
    if "layers" in fields and a.layers:
        kw["layers"] = tuple(a.layers)
    return get(f"edit/{name}").config(**kw)


def _single(handle, facts, name: str, a: argparse.Namespace) -> tuple[dict, tuple, Measured]:
    from lfm.edit.facts import evaluate_fact, summarise
    from lfm.registry import get

    cfg = _cfg(name, a)
    fn, rows, clock, costs = get(f"edit/{name}").fn, [], _Clock(), []
    for i, f in enumerate(facts, 1):
        with clock, Meter(handle.model) as meter:
            patch = fn(handle, f.request, cfg)
        costs.append(meter.result)
        undo = patch.apply(handle.model)
        rows.append(evaluate_fact(handle, f, gen_tokens=a.gen_tokens))
        undo.revert(handle.model)
        if i % 10 == 0 and i < len(facts):
            print(_row(f"  {name} first {i}", summarise(rows), clock.per(i)), flush=True)
    return summarise(rows), clock.per(len(facts)), total(costs)


class _Clock:
    """Wall and CPU seconds inside `with` blocks (CPU time is what a quiet machine's wall time
    would be with one thread; on the shared machine wall time is several times longer)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]

    def per(self, n: int) -> tuple[float, float]:
        return self.wall / n, self.cpu / n


def _batch(handle, facts, a: argparse.Namespace) -> tuple[dict, dict, tuple[float, float]]:
    from lfm.edit import memit

    clock = _Clock()
    with clock:
        patch = memit(handle, [f.request for f in facts], _cfg("memit", a))
    secs = clock.per(1)
    undo = patch.apply(handle.model)
    kept, every = _joint_eval(handle, facts, a.gen_tokens)
    undo.revert(handle.model)
    return kept, every, secs


def _joint_eval(handle, facts, gen_tokens: int) -> tuple[dict, dict]:
    """Metrics with several edits in place: neighbours naming an edited subject left out, and kept."""
    from lfm.edit.facts import evaluate_fact, neighbours, summarise

    subjects = [f.subject for f in facts]
    kept = summarise([evaluate_fact(handle, f, gen_tokens, subjects) for f in facts])
    kept["n_neighbours"] = sum(len(neighbours(f, subjects)) for f in facts)
    every = summarise([evaluate_fact(handle, f) for f in facts])
    return kept, every


def _sequential(handle, facts, name: str, a: argparse.Namespace) -> tuple[dict, dict, tuple]:
    """Apply the n edits one after another; evaluate all of them at the end; then revert."""
    from lfm.edit import alphaedit_step
    from lfm.edit.facts import evaluate_fact, summarise
    from lfm.registry import get

    cfg, state, undos, clock = _cfg(name, a), None, [], _Clock()
    for i, f in enumerate(facts, 1):
        with clock:
            if name == "alphaedit":
                patch, state = alphaedit_step(handle, f.request, state, cfg)
            else:
                patch = get(f"edit/{name}").fn(handle, f.request, cfg)
        undos.append(patch.apply(handle.model))
        if i % 25 == 0 and i < len(facts):  # efficacy over all edits so far
            so_far = summarise(
                [{"efficacy": evaluate_fact(handle, g)["efficacy"]} for g in facts[:i]]
            )
            print(_row(f"  {name} after {i}", so_far, clock.per(i)), flush=True)
    kept, every = _joint_eval(handle, facts, a.gen_tokens)
    for undo in reversed(undos):
        undo.revert(handle.model)
    return kept, every, clock.per(len(facts))


def _row(label: str, m: dict[str, float], secs: tuple[float, float] = (0.0, 0.0)) -> str:
    cols = ("efficacy", "paraphrase", "neighbourhood", "score", "generation", "fluency")
    vals = " ".join(
        f"{m[c]:8.2f}" if c == "fluency" and c in m else f"{m[c]:8.1f}" if c in m else f"{'-':>8}"
        for c in cols
    )
    return f"{label:<24}{vals} {secs[0]:8.2f} {secs[1]:8.2f}"


def _record(name: str, scores: dict, cost: Measured, n: int, params: int, a) -> None:
    import sys

    from lfm.pipeline.plan import record
    from lfm.registry import get

    key = get(name, area="edit").key
    summary = (f"Score {scores['score']:.1f} on {n} {a.model} facts, "
               f"{cost.cpu_s / n:.1f} CPU-s per fact")  # fmt: skip
    record(key, float(scores["score"]), summary, "python bench/edit.py " + " ".join(sys.argv[1:]),
           model=a.model, unit="fact", units=n, cost=cost, params=params,
           efficacy=scores["efficacy"], paraphrase=scores["paraphrase"],
           neighbourhood=scores["neighbourhood"])  # fmt: skip


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
    layers_for = [*a.methods, *a.sequential, *(["batch"] if a.batch else [])]
    wall, cpu = _stats(handle, layers_for, a)
    print(
        f"covariance statistics (built once, cached): {wall:.1f} s wall, {cpu:.1f} s CPU",
        flush=True,
    )
    head = ("efficacy", "paraphr", "neighb", "Score", "gen", "fluency", "wall s", "cpu s")
    print(f"{'method (s per edit)':<24}" + " ".join(f"{h:>8}" for h in head))
    base = summarise([evaluate_fact(handle, f, gen_tokens=a.gen_tokens) for f in use])
    print(_row("unedited", base), flush=True)
    for name in a.methods:
        scores, secs, cost = _single(handle, use, name, a)
        print(_row(name, scores, secs), flush=True)
        if a.record:
            params = sum(p.numel() for p in handle.model.parameters())
            _record(name, scores, cost, len(use), params, a)
    if a.batch:
        kept, every, secs = _batch(handle, use, a)
        print(_row(f"memit batch of {len(use)}", kept, secs) + " (total s)", flush=True)
        print(_row("  all neighbours", every, secs) + f" ({kept['n_neighbours']} kept)", flush=True)
    for name in a.sequential:
        kept, every, secs = _sequential(handle, use, name, a)
        print(_row(f"{name} {len(use)} in sequence", kept, secs), flush=True)
        print(_row("  all neighbours", every, secs) + f" ({kept['n_neighbours']} kept)", flush=True)


if __name__ == "__main__":
    main()
