"""Benchmark: lifelong editing — T edits in a row with GRACE, sequential AlphaEdit, UltraEdit,
WISE (and IKE).

    .venv/bin/python bench/edit_lifelong.py --model smollm2-135m --T 10 100
    .venv/bin/python bench/edit_lifelong.py --T 10 --methods grace
    .venv/bin/python bench/edit_lifelong.py --T 10 100 --methods ultraedit --facts lifelong
    .venv/bin/python bench/edit_lifelong.py --T 10 50 --methods grace ultraedit wise --facts lifelong

The first T facts the model knows are edited one after another: GRACE grows one codebook
(`grace(..., codebook=previous)`), AlphaEdit carries its state (`alphaedit_step`), UltraEdit its
lifelong statistics (`ultraedit_step`, `--turn` facts per turn, default 1; `--ue-lr` its η), each
patch applied before the next edit; WISE grows one side memory (`wise(..., memory=previous)`;
`--shard-size` edits per shard, default the paper's 500; `--wise-lr` its SGD step, default the
paper's 1.0), installed once after the T-th edit; IKE (`--methods ike`) stores the T facts in one
memory patch.
`--facts lifelong` draws the facts from the test split of the 1,102-request lifelong set
(`load_facts(name="lifelong", split="test")`) instead of the 316 packaged facts. After the T-th edit every one of the T facts is scored (CounterFact
protocol, `lfm.edit.facts`): efficacy over all T edits, paraphrase, neighbourhood (prompts naming
an edited subject left out), Score; then seconds per edit (wall and CPU) and, for GRACE, how the
codebook rule went (entries added, expanded, split), for WISE its shards, ε, and how many of the
edited, paraphrase and neighbourhood prompts the router sends to the side memory. Everything is
reverted at the end, and the unedited model is scored on the same facts as the peer row.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--T", type=int, nargs="+", default=[10, 100], help="edits in a row")
    p.add_argument(
        "--methods", nargs="+", default=["grace", "alphaedit"], help="ike, ultraedit, wise"
    )
    p.add_argument("--facts", choices=["facts", "lifelong"], default="facts", help="packaged set")
    p.add_argument("--turn", type=int, default=1, help="UltraEdit: facts per turn")
    p.add_argument("--ue-lr", type=float, default=None, help="UltraEdit's η (default 1e-6)")
    p.add_argument("--eps-init", type=float, default=None, help="GRACE's ε_init (default 1.0)")
    p.add_argument("--shard-size", type=int, default=None, help="WISE: edits per shard (500)")
    p.add_argument("--wise-lr", type=float, default=None, help="WISE's SGD step (default 1.0)")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="AlphaEdit: tokens for C")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


class _Clock:
    """Wall and CPU seconds inside `with` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


def _grace(handle, facts, a: argparse.Namespace):
    """One codebook over the T edits; returns the handle to score, its undo, the clock and the
    rule counts."""
    from lfm.edit import GraceConfig, grace

    cfg = GraceConfig() if a.eps_init is None else GraceConfig(eps_init=a.eps_init)
    patch, clock = None, _Clock()
    for f in facts:
        with clock:
            patch = grace(handle, f.request, cfg, codebook=patch)
    rules = Counter(s["rule"] for s in patch.info["steps"])
    return handle, [patch.apply(handle.model)], clock, dict(rules)


def _alphaedit(handle, facts, a: argparse.Namespace):
    """The T AlphaEdit steps, each patch applied before the next."""
    from lfm.edit import AlphaEditConfig, alphaedit_step

    cfg, state, undos, clock = AlphaEditConfig(stats_tokens=a.stats_tokens), None, [], _Clock()
    for f in facts:
        with clock:  # the first step also builds C per layer (cached on disk after)
            patch, state = alphaedit_step(handle, f.request, state, cfg)
        undos.append(patch.apply(handle.model))
    return handle, undos, clock, {}


def _ultraedit(handle, facts, a: argparse.Namespace):
    """Turns of `--turn` facts, each patch applied before the next turn."""
    from lfm.edit import UltraEditConfig, ultraedit_step

    cfg = UltraEditConfig() if a.ue_lr is None else UltraEditConfig(lr=a.ue_lr)
    state, undos, clock = None, [], _Clock()
    for i in range(0, len(facts), a.turn):
        with clock:
            patch, state = ultraedit_step(
                handle, [f.request for f in facts[i : i + a.turn]], state, cfg
            )
        undos.append(patch.apply(handle.model))
    return handle, undos, clock, {"turns": state.turns if state else 0, "lr": cfg.lr}


def _wise(handle, facts, a: argparse.Namespace):
    """One side memory over the T edits, installed after the last; the notes say how many
    prompts of each kind the router sends to the side memory (score above ε)."""
    from lfm.edit import WiseConfig, wise
    from lfm.edit.site import edit_site
    from lfm.edit.wise import activations, scores

    given = {"shard_size": a.shard_size, "lr": a.wise_lr}
    cfg = WiseConfig(**{k: v for k, v in given.items() if v is not None})
    memory, clock = None, _Clock()
    for f in facts:
        with clock:
            memory = wise(handle, f.request, cfg, memory=memory)
    site = edit_site(handle.model, int(memory.info["layer"]))

    def routed(prompts: list[str]) -> str:
        acts = activations(handle.model, handle.tokenizer, prompts, site)
        return f"{int((scores(memory.side, acts) > memory.epsilon).sum())}/{len(prompts)}"

    notes = {
        "lr": cfg.lr,
        "shards": len(memory.shards),
        "epsilon": round(memory.epsilon, 2),
        "routed edits": routed([f.prompt for f in facts]),
        "routed paraphrases": routed([p for f in facts for p in f.paraphrases]),
        "routed neighbours": routed([p for f in facts for p in f.neighbourhood]),
    }
    return handle, [memory.apply(handle.model)], clock, notes


def _ike(handle, facts, a: argparse.Namespace):
    """The T facts in one memory patch; a query gets the stored fact nearest to it, after k
    demonstrations from the other facts of the set (`minilm-l6` retrieval)."""
    from lfm.edit import ike

    clock = _Clock()
    with clock:
        editor = ike(handle, [f.request for f in facts]).apply(handle)
        editor.context(facts[0].prompt)  # the demonstrations' embeddings, computed once
    return editor, [], clock, {"demonstrations": len(editor.pool)}


def _score(handle, facts) -> dict[str, float]:
    from lfm.edit.facts import evaluate_fact, summarise

    subjects = [f.subject for f in facts]
    return summarise([evaluate_fact(handle, f, edited=subjects) for f in facts])


def _row(label: str, m: dict[str, float], secs: tuple[float, float] = (0.0, 0.0)) -> str:
    vals = " ".join(f"{m[c]:8.1f}" for c in ("efficacy", "paraphrase", "neighbourhood", "score"))
    return f"{label:<22}{vals} {secs[0]:8.2f} {secs[1]:8.2f}"


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    from lfm.assets import load_model
    from lfm.edit.facts import known_facts, load_facts

    handle = load_model(a.model)
    split = "test" if a.facts == "lifelong" else None
    known = known_facts(handle, load_facts(name=a.facts, split=split))
    print(f"{a.model}: knows {len(known)} facts", flush=True)
    head = ("efficacy", "paraphr", "neighb", "Score", "wall s", "cpu s")
    print(f"{'T edits (s per edit)':<22}" + " ".join(f"{h:>8}" for h in head))
    run = {"grace": _grace, "alphaedit": _alphaedit, "ike": _ike, "ultraedit": _ultraedit,
           "wise": _wise}  # fmt: skip
    for t in a.T:
        facts = known[:t]
        print(_row(f"unedited, {len(facts)} facts", _score(handle, facts)), flush=True)
        for name in a.methods:
            scored, undos, clock, notes = run[name](handle, facts, a)
            scores = _score(scored, facts)
            for undo in reversed(undos):
                undo.revert(handle.model)
            secs = (clock.wall / len(facts), clock.cpu / len(facts))
            print(_row(f"{name} T={len(facts)}", scores, secs), notes or "", flush=True)


if __name__ == "__main__":
    main()
