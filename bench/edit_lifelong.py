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
paper's 1.0; `--wise-routing subject`, `--wise-prefixes N`, `--wise-layer B`, `--wise-sink S` and
`--wise-retrieve K` (WISE-Retrieve: every K shards a side memory of their own), the options of
`WiseConfig`, name the row `wise (subject, N rows, block B, sink S, retrieve K)`), installed once after the T-th
edit; IKE (`--methods ike`) stores the T facts in one memory patch.
`--facts lifelong` draws the facts from the test split of the 1,496-request lifelong set
(`load_facts(name="lifelong", split="test")`) instead of the 316 packaged facts. After the T-th edit every one of the T facts is scored (CounterFact
protocol, `lfm.edit.facts`): efficacy over all T edits, paraphrase, neighbourhood (prompts naming
an edited subject left out), Score; then seconds per edit (wall and CPU) and, for GRACE, how the
codebook rule went (entries added, expanded, split), for WISE its shards, ε, and how many of the
edited, paraphrase and neighbourhood prompts the router sends to the side memory. Everything is
reverted at the end, and the unedited model is scored on the same facts as the peer row.
ROME and MEMIT (`--methods rome memit`) edit one fact after another, each patch in place before
the next. Fluency is the mean n-gram entropy of `--gen-tokens` greedy tokens after each edited
fact's generation prompts (`lfm.edit.facts.evaluate_fact`); the curves show it as the change from
the unedited model. Memory added: GRACE's codebook, WISE's side memory and masks (MiB); the
weight editors change weights in place (0); IKE adds context, reported as tokens per query.
`--budget S` skips a method's longer T once one of its runs took more than S seconds.
`--checkpoint DIR` keeps the progress of a ROME, MEMIT or AlphaEdit run every
`--checkpoint-every` edits (default 25) in DIR, and the same command run again resumes it (the
other methods take no checkpoint; a file of another selection or `--stats-tokens` is refused);
the file is removed once the run is scored.
Every row of `--json` records its selection (fact set, known or all facts, generation tokens);
`--reuse-unedited` takes the unedited row from `--json` when one of the same T and selection is
there instead of scoring the unedited model again (at T = 1,000 that scoring is about 25 minutes
on one CPU thread).

    .venv/bin/python bench/edit_lifelong.py --T 10 100 --methods grace ultraedit wise rome \
        --facts lifelong --json lifelong.json --plot lifelong.png
    .venv/bin/python bench/edit_lifelong.py --methods --json lifelong.json --plot lifelong.png
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
        "--methods",
        nargs="*",
        default=["grace", "alphaedit"],
        help="grace alphaedit ultraedit wise rome memit ike (none, with --plot: only draw)",
    )
    p.add_argument("--facts", choices=["facts", "lifelong"], default="facts", help="packaged set")
    p.add_argument(
        "--all-facts", action="store_true",
        help="edit the first T facts whether the model knows them or not (default: known only)",
    )  # fmt: skip
    p.add_argument("--turn", type=int, default=1, help="UltraEdit: facts per turn")
    p.add_argument("--ue-lr", type=float, default=None, help="UltraEdit's η (default 1e-6)")
    p.add_argument("--eps-init", type=float, default=None, help="GRACE's ε_init (default 1.0)")
    p.add_argument("--shard-size", type=int, default=None, help="WISE: edits per shard (500)")
    p.add_argument("--wise-lr", type=float, default=None, help="WISE's SGD step (default 1.0)")
    p.add_argument(
        "--wise-routing", choices=("prompt", "subject"), default=None,
        help="WISE: the edit's routing score over the prompt (default) or the subject's tokens",
    )  # fmt: skip
    p.add_argument(
        "--wise-prefixes", type=int, default=None,
        help="WISE: rows of the target NLL, the bare prompt and n − 1 context prefixes (1)",
    )  # fmt: skip
    p.add_argument(
        "--wise-layer", type=int, default=None,
        help="WISE: the block whose MLP output projection gets the side memory (⌊0.75·L⌋)",
    )  # fmt: skip
    p.add_argument(
        "--wise-sink", type=int, default=None,
        help="WISE: leading tokens that neither route nor get the side memory (0)",
    )  # fmt: skip
    p.add_argument(
        "--wise-retrieve", type=int, default=None, metavar="N",
        help="WISE-Retrieve: every N shards merged into a side memory of their own, a query "
        "getting the one it scores highest on (default: one side memory)",
    )  # fmt: skip
    p.add_argument("--stats-tokens", type=int, default=100_000, help="AlphaEdit: tokens for C")
    p.add_argument(
        "--gen-tokens", type=int, default=20,
        help="greedy tokens per generation prompt for fluency (0: no fluency)",
    )  # fmt: skip
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds per method: a longer T of a method whose last T took more is skipped")  # fmt: skip
    p.add_argument(
        "--json", default=None, help="add every row to this JSON file (kept across runs)"
    )
    p.add_argument(
        "--plot", default=None, help="draw each metric against T from --json into this PNG"
    )
    p.add_argument(
        "--reuse-unedited", action="store_true",
        help="take the unedited row of the same T and selection from --json instead of scoring it",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", default=None,
        help="ROME, MEMIT, AlphaEdit: keep the run's progress in this folder and resume from it",
    )  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=25, help="edits between checkpoints")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.plot and not a.json:
        p.error("--plot draws from the rows of --json FILE; give both")
    if a.checkpoint_every < 1:
        p.error(
            f"--checkpoint-every takes a count of edits of at least 1, not {a.checkpoint_every}"
        )
    if a.wise_retrieve is not None and a.wise_retrieve < 1:
        p.error(f"--wise-retrieve takes a count of shards of at least 1, not {a.wise_retrieve}")
    if a.reuse_unedited and not a.json:
        p.error("--reuse-unedited reads the unedited row from --json FILE; give both")
    return a


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
    book = patch.codebook
    notes = {**rules, "added_mib": _mib(book.keys, book.values, book.radii)}
    return handle, [patch.apply(handle.model)], clock, notes


def _sequential(name: str):
    """ROME or MEMIT applied one edit after another, each patch in place before the next."""

    def run(handle, facts, a: argparse.Namespace):
        from lfm.registry import get

        spec = get(f"edit/{name}")
        cfg = spec.config(stats_tokens=a.stats_tokens)
        ckpt = _Checkpoint(a, name, len(facts), handle.model)
        undos, clock, _ = ckpt.resume()
        for i, f in enumerate(facts[ckpt.done :], ckpt.done + 1):
            with clock:  # the first edit also builds C (cached on disk after)
                patch = spec.fn(handle, f.request, cfg)
            _keep(undos, patch.apply(handle.model))
            ckpt.maybe_save(i, undos, clock, last=i == len(facts))
        return handle, undos, clock, {"added_mib": 0.0}

    return run


class _Checkpoint:
    """`--checkpoint DIR`: the progress of one in-place sequential run (ROME, MEMIT, AlphaEdit)
    every `--checkpoint-every` edits, in one safetensors file written atomically — the weights
    the edits changed, as they were before the first and as they are now, AlphaEdit's keys, the
    edits done and the clock — so that a run longer than one process's life resumes where it
    stopped. Only a file of the same model, method, T, selection and statistics tokens is
    resumed; the weights it gives back are checked against AlphaEdit's fingerprint of them."""

    FORMAT = "lfm-bench-lifelong-checkpoint/1"

    def __init__(self, a: argparse.Namespace, method: str, t: int, model) -> None:
        from pathlib import Path

        self.model, self.every, self.done = model, a.checkpoint_every, 0
        self.tag = {"model": a.model, "method": method, "T": t, "selection": _selection(a),
                    "stats_tokens": a.stats_tokens}  # fmt: skip
        self.path = (
            Path(a.checkpoint) / f"{a.model}-{method}-T{t}.safetensors" if a.checkpoint else None
        )

    def resume(self, keys: bool = False):
        """(undos, clock, AlphaEdit state or None) from the file, or a fresh start."""
        from lfm.core.io import load_tensors
        from lfm.edit.base import edits
        from lfm.edit.patch import Undo
        from lfm.edit.sequential import AlphaEditState
        from lfm.errors import LfmError

        if self.path is None or not self.path.exists():
            return [], _Clock(), None
        try:
            tensors, meta = load_tensors(self.path, self.FORMAT)
        except LfmError as e:
            raise SystemExit(str(e)) from None
        other = [f"{k} {meta.get(k)!r}, not {v!r}" for k, v in self.tag.items() if meta.get(k) != v]
        if other:
            raise SystemExit(f"{self.path} is of another run ({'; '.join(other)}); "
                             "remove it or name another --checkpoint")  # fmt: skip
        with torch.no_grad(), edits(self.model):  # the base model's statistics fingerprints stay
            for k, w in tensors.items():
                if k.startswith("now."):
                    self.model.get_submodule(k[4:]).weight.copy_(w)
        undos = [Undo({k[5:]: w for k, w in tensors.items() if k.startswith("orig.")})]
        clock, self.done = _Clock(), int(meta["done"])
        clock.wall, clock.cpu = float(meta["wall"]), float(meta["cpu"])
        state = None
        if keys:
            got = {int(k[5:]): w for k, w in tensors.items() if k.startswith("keys.")}
            state = AlphaEditState(
                got, str(meta["base"]), str(meta["after"]), int(meta["per_edit"])
            )
        print(f"resumed {self.path.name} after {self.done} edits", flush=True)
        return undos, clock, state

    def maybe_save(
        self, done: int, undos: list, clock: _Clock, state=None, last: bool = False
    ) -> None:
        if self.path is None or (done % self.every and not last):
            return
        from lfm.core.io import save_tensors

        orig = {name: w for u in undos for name, w in u.originals.items()}
        tensors = {f"orig.{n}": w for n, w in orig.items()}
        tensors |= {f"now.{n}": self.model.get_submodule(n).weight for n in orig}
        meta = {**self.tag, "done": done, "wall": clock.wall, "cpu": clock.cpu}
        if state is not None:
            tensors |= {f"keys.{layer}": k for layer, k in state.keys.items()}
            meta |= {"base": state.base, "after": state.after, "per_edit": state.per_edit}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(self.path, tensors, self.FORMAT, **meta)

    def finish(self) -> None:
        """The run is scored and saved: its checkpoint is spent."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _keep(undos: list, undo) -> None:
    """Keep, per module, only its weights from before the first patch that touched it: reverting
    the kept undos in reverse order restores the model as well, and T patches in place hold one
    copy of each edited weight, not T (UltraEdit at T = 1,000 held 24 GB before this)."""
    from lfm.edit.patch import Undo

    seen = {name for u in undos for name in u.originals}
    first = {name: w for name, w in undo.originals.items() if name not in seen}
    if first:
        undos.append(Undo(first))


def _mib(*tensors: torch.Tensor) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _alphaedit(handle, facts, a: argparse.Namespace):
    """The T AlphaEdit steps, each patch applied before the next."""
    from lfm.edit import AlphaEditConfig, alphaedit_step

    cfg = AlphaEditConfig(stats_tokens=a.stats_tokens)
    ckpt = _Checkpoint(a, "alphaedit", len(facts), handle.model)
    undos, clock, state = ckpt.resume(keys=True)
    for i, f in enumerate(facts[ckpt.done :], ckpt.done + 1):
        with clock:  # the first step also builds C per layer (cached on disk after)
            patch, state = alphaedit_step(handle, f.request, state, cfg)
        _keep(undos, patch.apply(handle.model))
        ckpt.maybe_save(i, undos, clock, state, last=i == len(facts))
    return handle, undos, clock, {"added_mib": 0.0}


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
        _keep(undos, patch.apply(handle.model))
    notes = {"turns": state.turns if state else 0, "lr": cfg.lr, "added_mib": 0.0}
    return handle, undos, clock, notes


def _wise(handle, facts, a: argparse.Namespace):
    """One side memory over the T edits, installed after the last; the notes say how many
    prompts of each kind the router sends to the side memory (score above ε)."""
    from lfm.edit import WiseConfig, wise
    from lfm.edit.site import edit_site
    from lfm.edit.wise import activations

    given = {"shard_size": a.shard_size, "lr": a.wise_lr, "routing": a.wise_routing,
             "n_prefixes": a.wise_prefixes, "layer": a.wise_layer, "sink": a.wise_sink,
             "shards_per_memory": a.wise_retrieve}  # fmt: skip
    cfg = WiseConfig(**{k: v for k, v in given.items() if v is not None})
    memory, clock = None, _Clock()
    for f in facts:
        with clock:
            memory = wise(handle, f.request, cfg, memory=memory)
    site = edit_site(handle.model, int(memory.info["layer"]))

    def routed(prompts: list[str]) -> str:
        acts = activations(handle.model, handle.tokenizer, prompts, site)
        return f"{sum(m is not None for m in memory.routed(acts))}/{len(prompts)}"

    variant = [cfg.routing] if cfg.routing != "prompt" else []
    variant += [f"{cfg.n_prefixes} rows"] if cfg.n_prefixes > 1 else []
    variant += [f"block {cfg.layer}"] if cfg.layer is not None else []
    variant += [f"sink {cfg.sink}"] if cfg.sink else []
    variant += [f"retrieve {cfg.shards_per_memory}"] if cfg.shards_per_memory else []
    eps = memory.epsilons
    notes = {
        "variant": f" ({', '.join(variant)})" if variant else "",
        "lr": cfg.lr,
        "shards": len(memory.shards),
        "side memories": len(memory.sides),
        "epsilon": round(eps[0], 2) if len(eps) == 1 else f"{min(eps):.2f}-{max(eps):.2f}",
        "routed edits": routed([f.prompt for f in facts]),
        "routed paraphrases": routed([p for f in facts for p in f.paraphrases]),
        "routed neighbours": routed([p for f in facts for p in f.neighbourhood]),
        "added_mib": _mib(*memory.sides) + _mib(*(s.mask for s in memory.shards)),
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
    tokens = [len(handle.tokenizer(editor.context(f.prompt)).input_ids) for f in facts[:10]]
    notes = {"demonstrations": len(editor.pool), "context_tokens": sum(tokens) / len(tokens),
             "added_mib": 0.0}  # fmt: skip
    return editor, [], clock, notes


def _score(handle, facts, gen_tokens: int) -> dict[str, float]:
    from lfm.edit.facts import evaluate_fact, summarise

    subjects = [f.subject for f in facts]
    return summarise([evaluate_fact(handle, f, gen_tokens, edited=subjects) for f in facts])


COLUMNS = ("efficacy", "paraphrase", "neighbourhood", "score", "fluency")


def _row(label: str, m: dict[str, float], secs: tuple[float, float] = (0.0, 0.0)) -> str:
    vals = " ".join(f"{m.get(c, float('nan')):8.1f}" for c in COLUMNS)
    return f"{label:<22}{vals} {secs[0]:8.2f} {secs[1]:8.2f}"


def _save(path: str, model: str, method: str, t: int, row: dict) -> None:
    """Add one row to the JSON file {model: {method: {T: row}}}, written atomically."""
    import json
    import os
    from pathlib import Path

    file = Path(path)
    data = json.loads(file.read_text()) if file.exists() else {}
    data.setdefault(model, {}).setdefault(method, {})[str(t)] = row
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, file)


def _selection(a: argparse.Namespace) -> str:
    """Which facts a row is on: the set, known or all, and the generation tokens of fluency."""
    return f"{a.facts} {'all' if a.all_facts else 'known'}, gen {a.gen_tokens}"


def _kept(path: str, model: str, t: int, selection: str) -> dict | None:
    """The unedited row `_save` kept for this model, T and selection, or None."""
    import json
    from pathlib import Path

    file = Path(path)
    data = json.loads(file.read_text()) if file.exists() else {}
    row = data.get(model, {}).get("unedited", {}).get(str(t))
    return row if row is not None and row.get("selection") == selection else None


def plot(path: str, out: str) -> None:
    """One panel per metric (fluency as the change from the unedited model), x = T (log), one
    line per method, from the rows `_save` kept."""
    import json

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    data = json.loads(Path(path).read_text())
    panels = [("efficacy", "efficacy (%)"), ("paraphrase", "paraphrase (%)"),
              ("neighbourhood", "neighbourhood (%)"), ("fluency_change", "fluency − unedited (bits)"),
              ("cpu_s", "CPU seconds per edit"), ("added_mib", "memory added (MiB)")]  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    lines = sorted({(m, k) for m, methods in data.items() for k in methods})
    color = {line: f"C{i % 10}" for i, line in enumerate(lines)}  # one colour a line in every panel
    for model, methods in data.items():
        for method, rows in sorted(methods.items()):
            ts = sorted(rows, key=int)
            for ax, (key, _) in zip(axes.flat, panels, strict=True):
                pts = [(int(t), rows[t][key]) for t in ts if rows[t].get(key) is not None]
                if pts:
                    label = method if len(data) == 1 else f"{model} {method}"
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        label=label,
                        color=color[(model, method)],
                    )
    for ax, (_, title) in zip(axes.flat, panels, strict=True):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("T (edits in a row)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Lifelong editing: every metric after the T-th edit")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    a = _args()
    if a.plot and not a.methods:
        plot(a.json, a.plot)
        return
    torch.set_num_threads(a.threads)
    from lfm.assets import load_model
    from lfm.edit.facts import known_facts, load_facts

    handle = load_model(a.model)
    split = "test" if a.facts == "lifelong" else None
    pool = load_facts(name=a.facts, split=split)
    known = known_facts(handle, pool)
    print(f"{a.model}: knows {len(known)} of {len(pool)} facts", flush=True)
    if a.all_facts:
        known = pool
    head = ("efficacy", "paraphr", "neighb", "Score", "fluency", "wall s", "cpu s")
    print(f"{'T edits (s per edit)':<22}" + " ".join(f"{h:>8}" for h in head))
    run = {"grace": _grace, "alphaedit": _alphaedit, "ike": _ike, "ultraedit": _ultraedit,
           "wise": _wise, "rome": _sequential("rome"), "memit": _sequential("memit")}  # fmt: skip
    spent: dict[str, float] = {}
    for t in a.T:
        facts = known[:t]
        if len(facts) < t:
            print(f"only {len(facts)} known facts: T={t} runs on {len(facts)}", flush=True)
        selection = _selection(a)
        kept = _kept(a.json, a.model, len(facts), selection) if a.reuse_unedited else None
        base = kept if kept is not None else _score(handle, facts, a.gen_tokens)
        print(_row(f"unedited, {len(facts)} facts" + (" (kept)" if kept else ""), base), flush=True)
        if a.json and kept is None:
            row = {**base, "fluency_change": 0.0, "selection": selection}
            _save(a.json, a.model, "unedited", len(facts), row)
        for name in a.methods:
            if a.budget and spent.get(name, 0.0) > a.budget:
                print(f"{name} T={len(facts)}: skipped, its last run took {spent[name]:.0f} s "
                      f"(--budget {a.budget:.0f})", flush=True)  # fmt: skip
                continue
            t0 = time.perf_counter()
            scored, undos, clock, notes = run[name](handle, facts, a)
            scores = _score(scored, facts, a.gen_tokens)
            for undo in reversed(undos):
                undo.revert(handle.model)
            spent[name] = time.perf_counter() - t0
            secs = (clock.wall / len(facts), clock.cpu / len(facts))
            label = name + str(notes.pop("variant", "")) if notes else name  # a method's options
            print(_row(f"{label} T={len(facts)}", scores, secs), notes or "", flush=True)
            if a.json:
                change = scores.get("fluency", float("nan")) - base.get("fluency", float("nan"))
                row = {**scores, "fluency_change": change, "wall_s": secs[0], "cpu_s": secs[1],
                       "selection": selection,
                       **{k: v for k, v in notes.items() if isinstance(v, int | float)}}  # fmt: skip
                _save(a.json, a.model, label, len(facts), row)
            if a.checkpoint:
                _Checkpoint(a, name, len(facts), handle.model).finish()
    if a.plot and a.json:
        plot(a.json, a.plot)


if __name__ == "__main__":
    main()
