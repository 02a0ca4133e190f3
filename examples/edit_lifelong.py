"""Lifelong editing of SmolLM2: facts edited one after another into GRACE's codebook, WISE's
side memory and WISE-Retrieve's several side memories, then scored.

    .venv/bin/python examples/edit_lifelong.py [--n 8]

The first N facts SmolLM2 knows from the test split of the lifelong set are edited in a row
(one call per edit, each growing the memory of the call before, as `lfm edit apply --state`
does across runs). Nothing writes the model's weights: each memory installs as hooks and is
removed after scoring. Efficacy, paraphrase and neighbourhood are the CounterFact metrics of
`lfm.edit.facts` (docs/edit.md, "Lifelong editing"); `bench/edit_lifelong.py` runs the same at
T = 10 to 1,000.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lfm.assets import load_model
from lfm.edit import GraceConfig, WiseConfig, WiseMemory, grace, wise
from lfm.edit.facts import evaluate_fact, known_facts, load_facts, summarise


def score(handle, facts, patch=None) -> dict[str, float]:
    """The CounterFact metrics with `patch` installed (None: the unedited model); removed after.
    Neighbourhood prompts naming an edited subject are left out."""
    undo = patch.apply(handle.model) if patch is not None else None
    try:
        subjects = [f.subject for f in facts]
        return summarise([evaluate_fact(handle, f, 0, edited=subjects) for f in facts])
    finally:
        if undo is not None:
            undo.revert(handle.model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="facts edited in a row")
    n = p.parse_args().n
    torch.set_num_threads(2)
    handle = load_model("smollm2-135m")
    facts = known_facts(handle, load_facts(name="lifelong", split="test"))[:n]
    # block 27 with its first token out of routing, lr 0.1: docs/edit.md, "WISE on SmolLM2"
    late = WiseConfig(lr=0.1, layer=27, sink=1)
    editors = {
        "grace": lambda r, m: grace(handle, r, GraceConfig(), codebook=m),
        "wise": lambda r, m: wise(handle, r, late, memory=m),
        "wise-retrieve": lambda r, m: wise(
            handle, r, late.replace(shard_size=4, shards_per_memory=1), memory=m
        ),
    }
    print(f"{'':<14}{'efficacy':>9}{'paraphr':>9}{'neighb':>9}")
    unedited = score(handle, facts)
    print(f"{'unedited':<14}" + "".join(f"{unedited[k]:9.1f}" for k in METRICS))
    for name, edit in editors.items():
        memory = None
        for f in facts:  # one edit a call: the memory grows
            memory = edit(f.request, memory)
        m = score(handle, facts, memory)
        print(f"{name:<14}" + "".join(f"{m[k]:9.1f}" for k in METRICS), flush=True)
    path = memory.save(Path(tempfile.mkdtemp()) / "wise-retrieve.safetensors")
    loaded = WiseMemory.load(path)
    eps = ", ".join(f"{e:.1f}" for e in loaded.epsilons)
    print(f"saved {path}: {len(loaded.sides)} side memories, ε {eps}")


METRICS = ("efficacy", "paraphrase", "neighbourhood")

if __name__ == "__main__":
    main()
