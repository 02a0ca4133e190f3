"""Benchmark: MEND — a meta-trained editor against the untrained (identity) editor and the
unedited model, on the lifelong fact set.

    .venv/bin/python bench/edit_mend.py --model smollm2-135m --steps 5000 --minutes 40 --threads 1 --save mend-smollm2
    .venv/bin/python bench/edit_mend.py --editor mend-smollm2 --threads 1   # evaluate a saved editor

The editor is meta-trained (`train_mend`) on the train split of the lifelong set (431 facts)
for `--steps` steps or until `--minutes` of wall time (or loaded with `--editor`), then the first
`--n` facts of the test split that the model knows (its top-1 next token is the true object's
first token) are edited one at a time, each patch reverted before the next, and scored with the
CounterFact protocol (`lfm.edit.facts`): efficacy, paraphrase, neighbourhood, Score. Peers in the
same run: the unedited model, the untrained (identity) editor at each `--ft-alpha` (its update
is −α∇W, one gradient step), and the trained editor with its networks set back to the identity
(U = 0; its statistics and steps α kept: what the networks add). Also: the held-out meta-loss
parts (edit NLL on the prompt and its paraphrases, KL on the neighbourhood prompts) of each, and
the trained editor's `--n` edits applied one after another (sequential, scored after the last).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=1200, help="meta-training steps")
    p.add_argument("--minutes", type=float, default=None, help="stop training after (wall)")
    p.add_argument("--editor", default=None, help="a saved editor folder (no training)")
    p.add_argument("--save", default=None, help="save the trained editor to this folder")
    p.add_argument("--n", type=int, default=50, help="test facts edited")
    p.add_argument("--ft-alpha", type=float, nargs="*", default=[1e-4, 1e-2],
                   help="steps α of the identity editor (one gradient step)")  # fmt: skip
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--lr-init", type=float, default=None)
    p.add_argument("--c-edit", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def _row(name: str, m: dict, extra: str = "") -> str:
    cells = " | ".join(f"{m[k]:.1f}" for k in ("efficacy", "paraphrase", "neighbourhood", "score"))
    return f"| {name} | {cells} | {extra} |"


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    from lfm.assets import load_model
    from lfm.edit.facts import evaluate_fact, known_facts, load_facts, summarise
    from lfm.edit.mend import MendConfig, MendEditor, evaluate_editor, mend, train_mend

    handle = load_model(a.model)
    given = {"rank": a.rank, "lr_init": a.lr_init, "c_edit": a.c_edit}
    cfg = MendConfig(**{k: v for k, v in given.items() if v is not None})
    if a.editor:
        editor = MendEditor.load(a.editor)
        print(f"editor {a.editor}")
    else:
        train = load_facts(name="lifelong", split="train")
        t0, c0 = time.perf_counter(), time.process_time()
        limit = a.minutes * 60 if a.minutes else None
        editor, hist = train_mend(handle, train, cfg, steps=a.steps, max_seconds=limit)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        k = max(1, len(hist) // 10)
        print(
            f"trained {len(hist)} steps on {len(train)} facts: {wall:.0f} s wall, {cpu:.0f} s CPU"
        )
        for i in range(0, len(hist), k):
            part = hist[i : i + k]
            mean = {n: sum(h[n] for h in part) / len(part) for n in ("edit", "loc", "loss")}
            print(f"  steps {i + 1}-{i + len(part)}: edit NLL {mean['edit']:.3f}  KL "
                  f"{mean['loc']:.4f}  loss {mean['loss']:.4f}  α {part[-1]['alpha']:.2e}")  # fmt: skip
        if a.save:
            editor.save(a.save, config=cfg.to_dict(), steps=len(hist), history=hist)
            print(f"saved -> {a.save}")
    print("α per matrix:", ", ".join(f"{x:.2e}" for x in editor.alpha.tolist()))

    test = load_facts(name="lifelong", split="test")
    facts = known_facts(handle, test[: 4 * a.n])[: a.n]
    print(f"{len(facts)} known facts among the first {4 * a.n} of the test split")

    editors = {"MEND (trained)": editor}
    ablated = copy.deepcopy(editor)  # the networks set back to the identity: statistics, α kept
    with torch.no_grad():
        for net in ablated.nets.values():
            net.u.zero_()
    editors["MEND (trained), networks reset to the identity"] = ablated
    for alpha in a.ft_alpha:
        fresh = MendEditor.for_model(handle.model, cfg.replace(lr_init=alpha))
        editors[f"identity editor, α = {alpha:g} (one gradient step)"] = fresh

    lines = ["| editor | efficacy | paraphrase | neighbourhood | Score | s per edit |",
             "|---|---|---|---|---|---|",
             _row("unedited", summarise([evaluate_fact(handle, f) for f in facts]))]  # fmt: skip
    losses = []
    for name, ed in editors.items():
        rows, secs = [], 0.0
        for f in facts:
            t0 = time.perf_counter()
            patch = mend(handle, f.request, editor=ed)
            secs += time.perf_counter() - t0
            undo = patch.apply(handle.model)
            rows.append(evaluate_fact(handle, f))
            undo.revert(handle.model)
        lines.append(_row(name, summarise(rows), f"{secs / len(facts):.2f}"))
        m = evaluate_editor(handle, facts, ed)
        losses.append(f"| {name} | {m['edit']:.3f} | {m['loc']:.4f} |")

    undos = []  # the trained editor's edits one after another
    for f in facts:
        undos.append(mend(handle, f.request, editor=editor).apply(handle.model))
    subjects = [f.subject for f in facts]
    seq = summarise([evaluate_fact(handle, f, edited=subjects) for f in facts])
    for undo in reversed(undos):
        undo.revert(handle.model)
    lines.append(_row(f"MEND (trained), {len(facts)} edits in sequence", seq))

    print("\n".join(lines))
    print("\n| editor | held-out edit NLL (x_e, x'_e) | held-out KL (x_loc) |\n|---|---|---|")
    print("\n".join(losses))


if __name__ == "__main__":
    main()
