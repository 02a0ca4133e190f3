"""Second-moment statistics: computed once, then read from the cache."""

from __future__ import annotations

import pytest
import torch

from lfm.core.hooks import capture
from lfm.core.io import read_meta
from lfm.edit import common, stats


def test_second_moment_is_cached_and_not_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    h = common.smoke_model()
    model, tok = h.model, h.tokenizer
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
    (entry,) = (tmp_path / "edit-stats").glob("*-L1-tiny-200tok-32len")
    assert {f.name for f in entry.iterdir()} == {stats.FILE, "lfm-entry.json"}
    both = stats.second_moments(model, tok, [0, 1], "tiny", 200, 32, compute=compute)
    assert torch.equal(both[1], first) and len(calls) == 2  # only layer 0 was computed
    with pytest.raises(AssertionError, match="recomputed"):  # another budget is another file
        stats.second_moment(model, tok, 1, "tiny", 100, 32, compute=fail)


def test_second_moment_matches_a_hand_computation():
    h = common.smoke_model()
    model, tok = h.model, h.tokenizer
    texts = common.SMOKE_TEXTS[:2]
    name = "model.layers.0.mlp.down_proj"
    keys = []
    with torch.no_grad(), capture(model, [name], inputs=True) as acts:
        for text in texts:
            model(**tok(text, return_tensors="pt"))
            keys.append(acts[name][0].double())  # (T, D_in)
    # a budget that ends inside the second text: its first 3 tokens count, no more
    budget = len(keys[0]) + 3
    k = torch.cat([keys[0], keys[1][:3]])
    got = stats.compute_second_moments(model, tok, [0, 1], texts, budget, 64)[0]
    assert got.dtype == torch.float64
    assert torch.allclose(got, k.T @ k / budget)
    whole = stats.compute_second_moments(model, tok, [0], texts[:1], 1000, 64)[0]
    assert torch.allclose(whole, keys[0].T @ keys[0] / len(keys[0]))


def test_cached_statistics_are_tagged_and_a_file_of_another_kind_is_rebuilt(
    tmp_path, monkeypatch, capsys
):
    from safetensors.torch import save_file

    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    eye = {1: torch.eye(64, dtype=torch.float64)}
    first = stats.second_moments(h.model, h.tokenizer, [1], "tiny", 200, 32,
                                 compute=lambda *a: eye)[1]  # fmt: skip
    file = stats.stats_path(h.model, 1, "tiny", 200, 32) / stats.FILE
    meta = read_meta(file, stats.FORMAT)
    assert (meta["layer"], meta["corpus"], meta["tokens"]) == (1, "tiny", 200)
    assert torch.equal(first, torch.eye(64, dtype=torch.float64))
    save_file({"mom2": first}, str(file), metadata={"format": "lfm-edit-patch/1"})
    calls = []
    again = stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32,
                                compute=lambda *a: calls.append(1) or {1: 3 * eye[1]})  # fmt: skip
    assert calls == [1] and torch.equal(again, 3 * eye[1])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "edit-stats/" in line and stats.FILE in line and "rebuilding" in line


def _never(*args):
    raise AssertionError("recomputed although cached")


def test_statistics_say_computed_or_cached_and_show_a_bar(tmp_path, monkeypatch, capsys):
    from lfm.edit import progress

    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    h = common.smoke_model()
    said: list[str] = []
    with progress.reporting(said.append):
        stats.second_moments(h.model, h.tokenizer, [1], "tiny", 200, 32)
        bar = capsys.readouterr().err  # the tqdm bar over the tokens read
        stats.second_moments(h.model, h.tokenizer, [0, 1], "tiny", 200, 32)
    assert said[0].startswith("statistics: computing E[kkᵀ] at layer(s) 1 over 200 tokens")
    assert said[1:] == ["statistics: cached for layer(s) 1",
                        "statistics: computing E[kkᵀ] at layer(s) 0 over 200 tokens of tiny "
                        "(once; cached after)"]  # fmt: skip
    assert "statistics:" in bar and "/200 [" in bar and "tok/s" in bar
    capsys.readouterr()
    stats.second_moments(h.model, h.tokenizer, [0], "tiny", 150, 32)  # computed, nobody asked
    assert capsys.readouterr().err == "" and len(said) == 3


# What mutation testing (`make mutate AREA=edit`) found untested in `lfm.edit.stats`: the cache
# entry's name and parameters, and why a damaged entry is rebuilt.


def test_the_entry_is_named_and_marked_with_the_parameters_that_make_it(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    eye = {1: torch.eye(64, dtype=torch.float64)}
    stats.second_moments(h.model, h.tokenizer, [1], "tiny", 200, 32, compute=lambda *a: eye)
    fp = stats.key_fingerprint(h.model, 1)
    assert len(fp) == 64 and stats.stats_key(h.model, 1, "tiny", 200, 32) == (
        f"{fp[:16]}-L1-tiny-200tok-32len"
    )
    marker = json.loads((stats.stats_path(h.model, 1, "tiny", 200, 32) / "lfm-entry.json")
                        .read_text())  # fmt: skip
    assert marker["params"] == {"format": stats.FORMAT, "fingerprint": fp, "layer": 1,
                                "corpus": "tiny", "tokens": 200, "max_len": 32}  # fmt: skip


def test_the_default_corpus_is_bbc_news(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    asked: list[str] = []
    monkeypatch.setattr(stats, "corpus_texts", lambda c: asked.append(c) or common.SMOKE_TEXTS)
    h = common.smoke_model()
    stats.second_moments(h.model, h.tokenizer, [1], tokens=100, max_len=16)
    assert asked == ["bbc-news"]


@pytest.mark.parametrize(
    ("tensors", "fmt", "why"),
    [
        ({"mom2": torch.eye(3, dtype=torch.float64)}, None, "(C has shape (3, 3), not (64, 64))"),
        ({"mom2": torch.full((64, 64), float("nan"), dtype=torch.float64)}, None,
         "(C holds NaN or infinite values)"),
        ({"other": torch.eye(64, dtype=torch.float64)}, None, "('mom2')"),
        ({"mom2": torch.eye(64, dtype=torch.float64)}, "lfm-edit-patch/1",
         "(…/mom2.safetensors is not a lfm-edit-stats/1 file"),
    ],
)  # fmt: skip
def test_an_entry_with_a_sound_marker_but_a_wrong_c_is_rebuilt_saying_why(
    tmp_path, monkeypatch, capsys, tensors, fmt, why
):
    from lfm.core import cache
    from lfm.core.io import save_tensors

    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    args = (h.model, 1, "tiny", 200, 32)
    key, params = stats.stats_key(*args), stats._params(*args)
    # built without the check, so that its marker is sound and only what C holds is wrong
    cache.write(stats.KIND, key, params,
                lambda f: save_tensors(f / stats.FILE, tensors, fmt or stats.FORMAT))  # fmt: skip
    eye = {1: 2 * torch.eye(64, dtype=torch.float64)}
    got = stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32, compute=lambda *a: eye)
    assert torch.equal(got, eye[1])  # rebuilt
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: cache entry edit-stats/{key} fails its check (")
    assert why.removeprefix("(…") in line and line.endswith("rebuilding it"), line


def test_a_budget_of_exactly_d_in_tokens_is_enough():
    from lfm.edit.rome import RomeConfig
    from lfm.edit.site import edit_sites

    sites = edit_sites(common.smoke_model().model, [1])  # D_in = 64
    assert common.stats_args(RomeConfig(stats_tokens=64), sites)[1] == 64
    with pytest.raises(Exception, match=r"stats_tokens=63 is too small: .* D_in = 64 tokens"):
        common.stats_args(RomeConfig(stats_tokens=63), sites)


def test_second_moments_pass_their_defaults_budget_and_length_to_the_estimator(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    seen = []

    def compute(model, tok, layers, texts, tokens, max_len):
        seen.append((tokens, max_len))
        return {layer: torch.eye(64, dtype=torch.float64) for layer in layers}

    stats.second_moments(h.model, h.tokenizer, [1], compute=compute)  # the paper's defaults
    stats.second_moments(h.model, h.tokenizer, [1], "tiny", 200, 32, compute=compute)
    assert seen == [(100_000, 256), (200, 32)]
    meta = read_meta(stats.stats_path(h.model, 1, "tiny", 200, 32) / stats.FILE, stats.FORMAT)
    assert meta["max_len"] == 32


def test_statistics_name_every_layer_cached_and_computed(tmp_path, monkeypatch):
    from lfm.edit import progress

    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    eye = lambda *a: {layer: torch.eye(64, dtype=torch.float64) for layer in a[2]}  # noqa: E731
    said: list[str] = []
    with progress.reporting(said.append):
        stats.second_moments(h.model, h.tokenizer, [0, 1], "tiny", 200, 32, compute=eye)
        stats.second_moments(h.model, h.tokenizer, [0, 1], "tiny", 200, 32, compute=_never)
    assert said[0].startswith("statistics: computing E[kkᵀ] at layer(s) 0, 1 over 200 tokens")
    assert said[1] == "statistics: cached for layer(s) 0, 1"


def test_a_wrong_c_is_never_cached_and_an_entry_made_otherwise_is_rebuilt(
    tmp_path, monkeypatch, capsys
):
    from lfm.core import cache
    from lfm.core.io import save_tensors
    from lfm.errors import LfmError

    monkeypatch.setenv("LFM_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    small = {1: torch.eye(3, dtype=torch.float64)}
    with pytest.raises(LfmError, match=r"was built wrong \(C has shape \(3, 3\), not \(64, 64\)"):
        stats.second_moments(h.model, h.tokenizer, [1], "tiny", 200, 32, compute=lambda *a: small)
    assert not stats.stats_path(h.model, 1, "tiny", 200, 32).exists()
    # an entry under the same name whose marker records other parameters is not used
    args = (h.model, 1, "tiny", 200, 32)
    other = {**stats._params(*args), "tokens": 999}
    five = {"mom2": 5 * torch.eye(64, dtype=torch.float64)}
    cache.write(stats.KIND, stats.stats_key(*args), other,
                lambda f: save_tensors(f / stats.FILE, five, stats.FORMAT))  # fmt: skip
    eye = {1: torch.eye(64, dtype=torch.float64)}
    got = stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32, compute=lambda *a: eye)
    assert torch.equal(got, eye[1]) and "made with" in capsys.readouterr().err


def test_the_corpus_is_the_named_data_sets_training_split():
    from lfm.assets import load_dataset

    texts = stats.corpus_texts("bbc-news")
    assert list(texts) == list(load_dataset("bbc-news").train_texts) and len(texts) > 1000


def _keys(model, tok, text: str, name: str) -> torch.Tensor:
    with torch.no_grad(), capture(model, [name], inputs=True) as acts:
        model(**tok(text, return_tensors="pt"))
        return acts[name][0].double()  # (T, D_in)


def test_each_text_is_cut_to_max_len_tokens_and_one_token_is_its_own_moment():
    # an article is read up to `max_len` tokens (mutants compute_second_moments 37, 38, 41, 42,
    # 45: no cut, or the tokenizer's own limit); a budget of one token is divided by one (87:
    # `max(seen, 2)`)
    h = common.smoke_model()
    model, tok = h.model, h.tokenizer
    text = common.SMOKE_TEXTS[0]
    k = _keys(model, tok, text, "model.layers.0.mlp.down_proj")
    assert len(k) > 5
    got = stats.compute_second_moments(model, tok, [0], [text, text], 1000, 3)[0]
    assert torch.allclose(got, 2 * k[:3].T @ k[:3] / 6)
    one = stats.compute_second_moments(model, tok, [0], [text], 1, 64)[0]
    assert torch.allclose(one, k[:1].T @ k[:1])


def test_statistics_feed_the_tokens_on_the_models_device():
    # the model on the meta device stands for a GPU: the token ids go where the model is
    # (mutants compute_second_moments 9, 47: ids left on the CPU); every call mixing devices
    # fails under SameDevice
    from conftest import SameDevice

    h = common.smoke_model()
    h.model.to("meta")
    with SameDevice():
        got = stats.compute_second_moments(
            h.model, h.tokenizer, [0, 1], common.SMOKE_TEXTS[:2], 20, 8
        )
    assert got[0].is_meta and got[0].shape == (64, 64) and got[0].dtype == torch.float64


def test_the_covariance_is_float64_on_the_cpu_whichever_way_it_comes():
    from types import SimpleNamespace

    site = SimpleNamespace(layer=3, d_in=4)
    off = SimpleNamespace(use_cov=False)
    eye = common.covariance(None, None, site, off, None)
    assert eye.dtype == torch.float64 and torch.equal(eye, torch.eye(4, dtype=torch.float64))
    given = torch.arange(16.0).reshape(4, 4)  # float32
    for arg in (given, {3: given}):
        got = common.covariance(None, None, site, off, arg)
        assert got.dtype == torch.float64 and torch.equal(got, given.double())
    # a mapping without the site's layer: the config decides (here: identity)
    assert torch.equal(common.covariance(None, None, site, off, {2: given}), eye)
