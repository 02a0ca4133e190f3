"""Key-statistics fingerprints: hashed once per model, kept across edits, renewed otherwise."""

from __future__ import annotations

import torch

from lfm.edit import RomeConfig, base, common, rome, stats

CFG = RomeConfig(v_steps=2, n_prefixes=2, stats_corpus="tiny", stats_tokens=200, stats_max_len=32)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = base.hash_key_weights

    def counted(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(base, "hash_key_weights", counted)
    return calls


def test_second_edit_does_not_rehash_and_stats_stay_the_base_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    calls = _counting(monkeypatch)
    h = common.smoke_model()
    first = rome(h, common.SMOKE_REQUEST, CFG)
    fp = stats.key_fingerprint(h.model, 0)
    rome(h, common.SMOKE_REQUEST, CFG)
    assert len(calls) == 1
    undo = first.apply(h.model)  # an edit: the statistics stay those of the base model
    rome(h, common.SMOKE_REQUEST, CFG)
    assert len(calls) == 1 and stats.key_fingerprint(h.model, 0) == fp
    undo.revert(h.model)
    assert len(calls) == 1 and len(list((tmp_path / "edit-stats").iterdir())) == 1
    with torch.no_grad():  # any other change of the weights is another model
        h.model.get_submodule("model.embed_tokens").weight.mul_(2.0)
    assert stats.key_fingerprint(h.model, 0) != fp and len(calls) == 2


def test_fingerprint_covers_exactly_the_weights_that_make_the_keys():
    model = common.smoke_model().model
    fps = base.hash_key_weights(model)
    with torch.no_grad():  # layer 0's own output projection: not an input of its keys
        model.get_submodule("model.layers.0.mlp.down_proj").weight.add_(1.0)
    after = base.hash_key_weights(model)
    assert after[0] == fps[0] and after[1] != fps[1]
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.up_proj").weight.add_(1.0)
    assert base.hash_key_weights(model)[0] != fps[0]
