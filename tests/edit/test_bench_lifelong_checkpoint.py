"""`bench/edit_lifelong.py --checkpoint`: a sequential run stopped part-way resumes from its
checkpoint and ends on the same weights, to the bit, as the run that never stopped."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from lfm.edit import common, stats
from lfm.edit.facts import Fact

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("Kyoto", "Berlin", "Oslo", "Lima")


def _bench():
    spec = importlib.util.spec_from_file_location("edit_lifelong", ROOT / "bench/edit_lifelong.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _facts() -> list[Fact]:
    subjects = ("Eiffel Tower", "old bridge", "red house", "tall tree")
    return [
        Fact(i, "P1", s, f"The city of the {s}", "Paris", WORDS[i], (), ())
        for i, s in enumerate(subjects)
    ]


def _args(tmp_path: Path, method: str, checkpoint: bool) -> argparse.Namespace:
    return argparse.Namespace(
        model="smoke", facts="lifelong", all_facts=True, gen_tokens=0, stats_tokens=200,
        checkpoint=str(tmp_path / "ckpt") if checkpoint else None, checkpoint_every=1,
    )  # fmt: skip


def _weights(model, names) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def _fail_at(n: int, method: str, monkeypatch) -> None:
    """The n-th edit of `method` raises, as a stopped process would."""
    import dataclasses

    import lfm.edit as edit
    import lfm.registry as registry

    calls = {"n": 0}

    def failing(fn):
        def step(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return fn(*a, **k)

        return step

    if method == "alphaedit":
        monkeypatch.setattr(edit, "alphaedit_step", failing(edit.alphaedit_step))
    else:
        spec = registry.get(f"edit/{method}")
        patched = dataclasses.replace(spec, fn=failing(spec.fn))
        get = registry.get
        monkeypatch.setattr(
            registry, "get", lambda name: patched if name == f"edit/{method}" else get(name)
        )


@pytest.mark.parametrize("method", ["alphaedit", "rome"])
def test_a_stopped_run_resumes_to_the_same_weights(method, tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    bench, facts = _bench(), _facts()
    run = bench._alphaedit if method == "alphaedit" else bench._sequential(method)

    whole = common.smoke_model()
    _, undos, _, _ = run(whole, facts, _args(tmp_path, method, checkpoint=False))
    names = sorted(undos[0].originals)
    want = _weights(whole.model, names)

    # the third edit fails: the checkpoint holds the first two
    h = common.smoke_model()
    _fail_at(3, method, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(h, facts, _args(tmp_path, method, checkpoint=True))
    monkeypatch.undo()
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    assert not torch.equal(_weights(h.model, names)[names[0]], want[names[0]])

    # a fresh process's model: the run picks up after the second edit
    fresh = common.smoke_model()
    base = _weights(fresh.model, names)
    _, undos2, clock, _ = run(fresh, facts, _args(tmp_path, method, checkpoint=True))
    got = _weights(fresh.model, names)
    assert all(torch.equal(got[n], want[n]) for n in names)
    assert clock.cpu > 0
    # the undo kept across the stop still restores the unedited weights
    for undo in reversed(undos2):
        undo.revert(fresh.model)
    assert all(torch.equal(fresh.model.get_submodule(n).weight, base[n]) for n in names)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    bench, facts = _bench(), _facts()
    h = common.smoke_model()
    a = _args(tmp_path, "rome", checkpoint=True)
    a.checkpoint_every = 2
    bench._sequential("rome")(h, facts[:2], a)  # T = 2, saved after its last edit
    ckpt = Path(a.checkpoint) / "smoke-rome-T2.safetensors"
    assert ckpt.exists()
    other = argparse.Namespace(**{**vars(a), "gen_tokens": 10})  # another selection, same name
    with pytest.raises(SystemExit, match="of another run"):
        bench._sequential("rome")(common.smoke_model(), facts[:2], other)
