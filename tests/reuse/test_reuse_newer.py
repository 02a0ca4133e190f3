"""Model Breadcrumbs, DELLA, TSV-Merge, Iso-C and Iso-CTS against hand computations (NumPy on small
task matrices), their mergekit translations, and the streaming engine against the in-memory merge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lfm.errors import ConfigError, LfmError
from lfm.reuse import merge_models, merge_state_dicts
from lfm.reuse.plan import from_mergekit

from conftest import make_lm


def _tasks(*shapes_or_taus, seed: int = 0):
    """A zero base and one model per task vector (given, or random of the given shape)."""
    gen = torch.Generator().manual_seed(seed)
    taus = [t if isinstance(t, torch.Tensor) else torch.randn(t, generator=gen)
            for t in shapes_or_taus]  # fmt: skip
    base = torch.zeros_like(taus[0])
    return {"x": base}, [{"x": base + t} for t in taus], taus


def _merged(method, taus, cfg=None, **kw) -> torch.Tensor:
    base, sds, _ = _tasks(*taus)
    return merge_state_dicts(method, base, sds, cfg, **kw)["x"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ---------------------------------------------------------------------------------------------
# Model Breadcrumbs


def _shuffled_magnitudes(seed: int) -> torch.Tensor:
    """A 4 x 3 task vector whose magnitudes are 1 ... 12, in a random order with random signs."""
    gen = torch.Generator().manual_seed(seed)
    mags = torch.randperm(12, generator=gen).float() + 1
    signs = torch.where(torch.rand(12, generator=gen) < 0.5, -1.0, 1.0)
    return (mags * signs).reshape(4, 3)


def test_breadcrumbs_keeps_exactly_the_middle_band():
    # 12 entries; β = 1/12 drops the largest (|τ| = 12), γ = 0.5 the six smallest (1 ... 6)
    taus = [_shuffled_magnitudes(0), _shuffled_magnitudes(1)]
    cfg = {"drop_top": 1 / 12, "drop_bottom": 0.5, "scale": 0.5}
    want = sum(torch.where((t.abs() > 6) & (t.abs() < 12), t, 0.0) for t in taus)
    torch.testing.assert_close(_merged("breadcrumbs", taus, cfg), 0.5 * want)
    # only the top dropped, or only the bottom: other bands
    top_only = _merged("breadcrumbs", taus[:1], {"drop_top": 1 / 12, "drop_bottom": 0.0})
    torch.testing.assert_close(top_only, torch.where(taus[0].abs() < 12, taus[0], 0.0))
    bottom_only = _merged("breadcrumbs", taus[:1], {"drop_top": 0.0, "drop_bottom": 0.75})
    torch.testing.assert_close(bottom_only, torch.where(taus[0].abs() > 9, taus[0], 0.0))


def test_breadcrumbs_ties_elects_signs_over_the_masked_vectors():
    a = torch.tensor([[10.0, -3.0, 2.0, 1.0]])
    b = torch.tensor([[-4.0, 5.0, -6.0, 0.5]])
    # β = γ = 0.25 keeps the 2nd and 3rd magnitudes: a -> [0, -3, 2, 0], b -> [-4, 5, 0, 0]
    # signs of the sum [-4, 2, 2, 0]: -, +, +, 0; disjoint means: -4, 5, 2, 0
    cfg = {"drop_top": 0.25, "drop_bottom": 0.25}
    got = _merged("breadcrumbs_ties", [a, b], cfg)
    torch.testing.assert_close(got, torch.tensor([[-4.0, 5.0, 2.0, 0.0]]))
    summed = _merged("breadcrumbs_ties", [a, b], {**cfg, "normalize": False})
    torch.testing.assert_close(summed, torch.tensor([[-4.0, 5.0, 2.0, 0.0]]))
    linear = _merged("breadcrumbs", [a, b], cfg)
    torch.testing.assert_close(linear, torch.tensor([[-4.0, 2.0, 2.0, 0.0]]))


def test_breadcrumbs_refuses_a_band_that_masks_everything():
    with pytest.raises(ConfigError, match="drop_top \\+ drop_bottom must be below 1"):
        _merged("breadcrumbs", [torch.ones(3)], {"drop_top": 0.5, "drop_bottom": 0.5})


# ---------------------------------------------------------------------------------------------
# DELLA


def test_della_drop_probabilities_follow_the_rank_and_kept_entries_are_rescaled():
    # 4000 rows with the magnitudes 5 > 4 > 3 > 2 > 1: ranks 0 ... 4 in every row
    row = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0])
    tau = row.repeat(4000, 1)
    p, eps = 0.5, 0.4
    drop = p - eps / 2 + eps * torch.arange(5) / 4  # 0.3, 0.4, 0.5, 0.6, 0.7 by rank
    got = _merged("della_linear", [tau], {"drop_rate": p, "window": eps, "seed": 3})
    kept = got != 0
    torch.testing.assert_close(kept.float().mean(0), 1 - drop, atol=0.03, rtol=0)
    want = (row / (1 - drop)).expand_as(tau)  # kept entries: τ_j / (1 − p_j), exactly
    assert torch.equal(got[kept], want[kept])
    # rows are ranked on their own: a row scaled by 100 has the same probabilities
    big = _merged("della_linear", [torch.cat([tau[:1] * 100, tau[1:]])], {"drop_rate": p,
                  "window": eps, "seed": 3})  # fmt: skip
    assert torch.equal(big[1:] != 0, kept[1:])


def test_della_is_unbiased_over_seeds():
    taus = [torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    runs = 400
    one = [_merged("della", taus[:1], {"seed": s, "scale": 1.0}) for s in range(runs)]
    # one model: E[MagPrune(τ)] = τ, the TIES merge without pruning
    ties = _merged("ties", taus[:1], {"density": 1.0})
    torch.testing.assert_close(torch.stack(one).mean(0), ties, atol=0.2, rtol=0)
    lin = [_merged("della_linear", taus, {"seed": s}) for s in range(runs)]
    torch.testing.assert_close(torch.stack(lin).mean(0), sum(taus), atol=0.3, rtol=0)
    assert not torch.equal(lin[0], lin[1])  # the seed moves the masks


def test_della_is_seeded_per_tensor_and_model_and_refuses_out_of_range_probabilities():
    taus = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    assert torch.equal(_merged("della", taus, {"seed": 1}), _merged("della", taus, {"seed": 1}))
    with pytest.raises(ConfigError, match="drop_rate ± window/2 must lie in"):
        _merged("della", taus, {"drop_rate": 0.1, "window": 0.4})
    with pytest.raises(ConfigError, match="drop_rate ± window/2 must lie in"):
        _merged("della", taus, {"drop_rate": 0.9, "window": 0.2})


# ---------------------------------------------------------------------------------------------
# TSV-Merge


def _polar(a: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def test_tsv_of_one_task_is_its_top_k_reconstruction():
    tau = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    u, s, vt = np.linalg.svd(_np(tau), full_matrices=False)
    top1 = s[0] * np.outer(u[:, 0], vt[0])
    got = _merged("tsv_merge", [tau], {"rank_fraction": 1 / 3})  # k = 1 of r = 3
    np.testing.assert_allclose(_np(got), top1, atol=1e-5)
    # the paper's k = r / T keeps all of one task: the task vector itself, scaled by α
    np.testing.assert_allclose(_np(_merged("tsv_merge", [tau], {"scale": 0.5})), 0.5 * _np(tau),
                               atol=1e-5)  # fmt: skip


def test_tsv_of_orthogonal_tasks_is_their_sum():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    r, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    # rank one each, in orthogonal row and column spaces: k = 3 // 2 = 1 keeps each whole
    taus = [3.0 * torch.outer(q[:, 0], r[:, 0]), 2.0 * torch.outer(q[:, 1], r[:, 2])]
    np.testing.assert_allclose(_np(_merged("tsv_merge", taus)), _np(taus[0] + taus[1]), atol=1e-5)


def test_tsv_whitens_the_concatenated_singular_vectors():
    taus = [torch.randn(5, 4, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    weights = [1.0, 0.5]
    us, ss, vs = [], [], []
    for w, t in zip(weights, taus, strict=True):
        u, s, vt = np.linalg.svd(w * _np(t), full_matrices=False)
        us.append(u[:, :2]), ss.append(s[:2]), vs.append(vt[:2].T)  # k = 4 // 2
    u_perp, v_perp = _polar(np.hstack(us)), _polar(np.hstack(vs))
    want = u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T
    got = _merged("tsv_merge", taus, {"scale": 0.7}, weights=weights)
    np.testing.assert_allclose(_np(got), 0.7 * want, atol=1e-5)
    # without the whitening (Σ U_i Σ_i V_iᵀ of the truncations) the answer differs
    plain = sum(u @ np.diag(s) @ v.T for u, s, v in zip(us, ss, vs, strict=True))
    assert np.abs(0.7 * plain - _np(got)).max() > 1e-2


def test_spectral_merges_average_vectors_and_scalars():
    base = {"b": torch.zeros(3), "s": torch.tensor(1.0)}
    sds = [{"b": torch.tensor([1.0, 2.0, 3.0]), "s": torch.tensor(3.0)},
           {"b": torch.tensor([3.0, 0.0, 1.0]), "s": torch.tensor(5.0)}]  # fmt: skip
    for method in ("tsv_merge", "iso_c", "iso_cts"):
        out = merge_state_dicts(method, base, sds, {"scale": 0.5}, weights=[1.0, 2.0])
        torch.testing.assert_close(out["b"], 0.5 * torch.tensor([3.5, 1.0, 2.5]))
        torch.testing.assert_close(out["s"], torch.tensor(1.0 + 0.5 * (2.0 + 8.0) / 2))


# ---------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS


def test_iso_c_flattens_the_spectrum_of_the_sum():
    taus = [torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    delta = _np(2 * taus[0] + taus[1])
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    got = _np(_merged("iso_c", taus, {"scale": 1.5}, weights=[2.0, 1.0]))
    np.testing.assert_allclose(np.linalg.svd(got, compute_uv=False), 1.5 * s.mean() * np.ones(3),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(got, 1.5 * s.mean() * u @ vt, atol=1e-5)  # Δ's singular vectors
    assert np.ptp(s) > 0.5  # Δ's own spectrum is far from flat


def _iso_cts_by_hand(taus: list[np.ndarray], k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    r = min(taus[0].shape)
    per_task = (r - k) // len(taus)
    us, vs, ss = [u[:, :k]], [vt[:k].T], [s[:k]]
    for t in taus:
        ut, st, vtt = np.linalg.svd(t - u[:, :k] @ u[:, :k].T @ t, full_matrices=False)
        us.append(ut[:, :per_task]), vs.append(vtt[:per_task].T), ss.append(st[:per_task])
    return np.concatenate(ss).mean() * _polar(np.hstack(us)) @ _polar(np.hstack(vs)).T


def test_iso_cts_adds_task_specific_directions():
    taus = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    # r = 5, c = 0.4: k = 2 common directions, (5 − 2) // 2 = 1 task-specific one per task
    got = _np(_merged("iso_cts", taus, {"common_fraction": 0.4}))
    want = _iso_cts_by_hand([_np(t) for t in taus], k=2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    sv = np.linalg.svd(got, compute_uv=False)
    np.testing.assert_allclose(sv[:4], sv[0] * np.ones(4), rtol=1e-5)  # 2 + 2 directions, flat
    assert sv[4] < 1e-5
    # the common directions alone (the task-specific step left out) are another matrix
    u, s, vt = np.linalg.svd(sum(_np(t) for t in taus), full_matrices=False)
    assert np.abs(s[:2].mean() * u[:, :2] @ vt[:2] - got).max() > 1e-2


def test_iso_cts_keeps_at_least_one_common_direction():
    taus = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    # r = 5, c = 0.05: round(0.25) = 0 common directions, raised to 1; (5 − 1) // 2 = 2 per task
    got = _np(_merged("iso_cts", taus, {"common_fraction": 0.05}))
    np.testing.assert_allclose(got, _iso_cts_by_hand([_np(t) for t in taus], k=1), atol=1e-5)
    assert np.abs(got - _iso_cts_by_hand([_np(t) for t in taus], k=2)).max() > 1e-2


def test_a_failed_svd_is_one_line_naming_the_matrix():
    from lfm.reuse import spectral

    with pytest.raises(LfmError) as info:
        spectral.svd(torch.full((4, 3), float("nan")))
    msg = str(info.value)
    assert msg.startswith("the SVD of a [4, 3] task matrix failed (")
    assert msg.endswith("); check the models and their weights") and "\n" not in msg


def test_iso_cts_without_task_specific_directions_is_iso_c():
    taus = [torch.randn(6, 5, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    iso_c = _merged("iso_c", taus, {"scale": 0.8})
    assert torch.equal(_merged("iso_cts", taus, {"common_fraction": 1.0, "scale": 0.8}), iso_c)
    assert not torch.allclose(_merged("iso_cts", taus, {"scale": 0.8}), iso_c)


def test_spectral_merges_of_overflowing_weights_fail_in_one_line():
    taus = [torch.ones(3, 2), torch.ones(3, 2)]
    for method in ("tsv_merge", "iso_c", "iso_cts"):
        with pytest.raises(LfmError, match="NaN or infinite values") as info:
            _merged(method, taus, weights=[3e38, 3e38])
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# mergekit files


MK = {"base_model": "x", "models": ["y", "z"]}


def test_mergekit_breadcrumbs_and_della_parameters_are_translated():
    bc = from_mergekit({**MK, "merge_method": "breadcrumbs",
                        "parameters": {"density": 0.9, "gamma": 0.01, "lambda": 0.5}})  # fmt: skip
    assert bc.parameters == pytest.approx({"drop_top": 0.01, "drop_bottom": 0.09, "scale": 0.5})
    # mergekit's defaults keep everything; a gamma above 1 − density is cut to it
    assert from_mergekit({**MK, "merge_method": "breadcrumbs"}).parameters == {
        "drop_top": 0.0, "drop_bottom": 0.0}  # fmt: skip
    cut = from_mergekit({**MK, "merge_method": "breadcrumbs_ties",
                         "parameters": {"density": 0.95, "gamma": 0.1}}).parameters  # fmt: skip
    assert cut == pytest.approx({"drop_top": 0.05, "drop_bottom": 0.0, "normalize": False})
    della = from_mergekit({**MK, "merge_method": "della",
                           "parameters": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1}})  # fmt: skip
    assert della.parameters == pytest.approx({"drop_rate": 0.3, "window": 0.14, "scale": 1.1})
    lin = from_mergekit({**MK, "merge_method": "della_linear", "parameters": {"normalize": True},
                         "models": [{"model": "y", "parameters": {"weight": 3}}, "z"]})  # fmt: skip
    assert lin.weights == [0.75, 0.25] and lin.parameters == {"drop_rate": 0.0, "window": 0.0}


@pytest.mark.parametrize(
    ("method", "parameters", "match"),
    [
        ("della", {"rescale": False}, "rescale: false is not supported with della"),
        ("breadcrumbs", {"rescale": True}, "rescale: true is not supported with breadcrumbs"),
        ("della", {"density": 0.5, "window": 0.1}, "give density and epsilon .* not both"),
        ("breadcrumbs", {"gamma": 0.1, "drop_top": 0.1}, "give density and gamma .* not both"),
        ("breadcrumbs", {"gamma": 2}, "gamma is the fraction of largest magnitudes"),
        ("della", {"gamma": 0.1}, "'gamma' is not supported with della"),
        ("ties", {"epsilon": 0.1}, "'epsilon' is not supported with ties"),
    ],
)
def test_mergekit_breadcrumbs_and_della_refusals(method, parameters, match):
    with pytest.raises(LfmError, match=match) as info:
        from_mergekit({**MK, "merge_method": method, "parameters": parameters})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Streaming engine


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2), ("c", 3)):
        model, tok = make_lm("llama", seed=0)
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / name, max_shard_size="30KB")
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _disk_sd(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize(
    ("method", "cfg"),
    [
        ("breadcrumbs", {"scale": 0.5}),
        ("breadcrumbs_ties", {}),
        ("della", {"seed": 4}),
        ("della_linear", {"seed": 4}),
        ("tsv_merge", {}),
        ("iso_c", {"scale": 0.7}),
        ("iso_cts", {}),
    ],
)
def test_streamed_merge_equals_in_memory(zoo, tmp_path, method, cfg):
    paths = [zoo[m] for m in "abc"]
    out = merge_models(method, paths, tmp_path / "out", base=zoo["base"], cfg=cfg,
                       weights=[1.0, 0.5, 2.0], max_shard_size="40KB", progress=False)  # fmt: skip
    expected = merge_state_dicts(method, _disk_sd(zoo["base"]), [_disk_sd(p) for p in paths], cfg,
                                 weights=[1.0, 0.5, 2.0])  # fmt: skip
    got = _disk_sd(out)
    assert got.keys() == expected.keys() and len(list(out.glob("*.safetensors"))) > 1
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(expected[name], _disk_sd(zoo["base"])[name])
