"""Second-moment statistics: computed once, then read from the cache."""

from __future__ import annotations

import pytest
import torch

from lfm.edit import common, stats


def test_second_moment_is_cached_and_not_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    model, tok = common.tiny_lm(0)
    calls = []

    def compute(*args):
        calls.append(1)
        return stats.compute_second_moments(*args)

    first = stats.second_moment(model, tok, 1, "tiny", 200, 32, compute=compute)
    assert first.shape == (64, 64) and first.dtype == torch.float64
    assert torch.allclose(first, first.T) and torch.linalg.eigvalsh(first).min() > -1e-9

    def fail(*args):
        raise AssertionError("recomputed although cached")

    again = stats.second_moment(model, tok, 1, "tiny", 200, 32, compute=fail)
    assert torch.equal(first, again) and len(calls) == 1
    assert list((tmp_path / "edit-stats").glob("*-L1-tiny-200tok-32len.safetensors"))
    both = stats.second_moments(model, tok, [0, 1], "tiny", 200, 32, compute=compute)
    assert torch.equal(both[1], first) and len(calls) == 2  # only layer 0 was computed
    with pytest.raises(AssertionError, match="recomputed"):  # another budget is another file
        stats.second_moment(model, tok, 1, "tiny", 100, 32, compute=fail)


def test_second_moment_matches_a_hand_computation():
    model, tok = common.tiny_lm(0)
    text = common.SMOKE_TEXTS[0]
    got = stats.compute_second_moments(model, tok, [0, 1], [text], 1000, 64)[0]
    from lfm.access import capture

    name = "model.layers.0.mlp.down_proj"
    keys = {}
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: keys.update(k=a[0][0]))
    with torch.no_grad(), capture(model, [name]):
        model(**tok(text, return_tensors="pt"))
    h.remove()
    k = keys["k"].double()
    assert torch.allclose(got, k.T @ k / k.shape[0])
