"""Behaviour of the merge kernels that `make mutate AREA=reuse` found untested: Model Stock with a
base that is not zero, SLERP between vectors that are not unit vectors or are nearly zero,
trimming in half and double precision, DELLA's ranks (vectors, ties, rows of one), the seeds of
the random drops, λ and the weights, and the exact model-wide TIES threshold on the magnitudes
real task vectors have (small, tied, zero, crowded), with its memory bounded by one bucket. The
registered methods are checked, on hand-worked tensors, to pass on their config's λ, `normalize`,
sign election and eps, to copy a tensor that only one model has, and (TIES) to refuse model-wide
thresholds that do not cover every model. The survivors that change nothing the methods promise
are listed in tests/mutation_equivalents.md.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from lfm import registry
from lfm.reuse import kernels as K
from lfm.reuse import merge_state_dicts, topk
from lfm.reuse.driver import Ctx
from lfm.reuse.topk import model_threshold

from conftest import SameDevice


def _angle_cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


# -- Model Stock -----------------------------------------------------------------------------------


def test_model_stock_by_hand_with_three_models_and_a_base_that_is_not_zero():
    base = torch.tensor([1.0, -2.0, 0.5])
    taus = [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([1.0, 1.0, 1.0]),
    ]
    cos = [_angle_cos(taus[i], taus[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    c = sum(cos) / 3  # the mean over the three pairs
    t = 3 * c / (1 + 2 * c)
    mean = base + sum(taus) / 3
    want = t * mean + (1 - t) * base
    out = merge_state_dicts("model_stock", {"x": base}, [{"x": base + d} for d in taus])["x"]
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, t * mean)  # the base really contributes (1 − t) θ_b


def test_model_stock_depends_on_the_angle_only_not_on_the_size_of_the_task_vectors():
    # fine-tuning moves weights by ~1e-3: the ratio t must be that of the same angle at any scale
    base = torch.tensor([0.3, -0.1, 2.0, 1.0])
    d1, d2 = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    t = K.model_stock_ratio(_angle_cos(d1, d2), 2)
    for s in (1e-3, 1.0, 10.0):
        out = K.model_stock(base, [base + s * d1, base + s * d2])
        torch.testing.assert_close(out, base + t * s * (d1 + d2) / 2)


def test_model_stock_eps_floors_the_norms_of_the_task_vectors():
    base = torch.zeros(2)
    small = [torch.tensor([1e-3, 0.0]), torch.tensor([1e-3, 1e-3])]
    # with eps = 1 both norms count as 1: cos = 1e-6, so t is about 2e-6 and the merge stays at base
    out = K.model_stock(base, small, eps=1.0)
    t = K.model_stock_ratio(1e-6, 2)
    torch.testing.assert_close(out, t * (small[0] + small[1]) / 2)
    # the default eps leaves such norms alone (cos 45°)
    t45 = K.model_stock_ratio(math.sqrt(0.5), 2)
    torch.testing.assert_close(K.model_stock(base, small), t45 * (small[0] + small[1]) / 2)


def test_model_stock_ratio_stays_in_zero_one_even_when_rounding_pushes_cos_past_one():
    assert K.model_stock_ratio(1.0, 3) == 1.0
    assert K.model_stock_ratio(1.0 + 1e-6, 3) == 1.0
    assert K.model_stock_ratio(1.5, 2) == 1.0


def test_mean_pairwise_cosine_is_the_mean_over_all_pairs():
    taus = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    h = math.sqrt(0.5)
    assert K.mean_pairwise_cosine(taus) == pytest.approx((0 + h + h) / 3)
    tiny = [1e-4 * t for t in taus]  # scale-free, as long as the norms are above eps
    assert K.mean_pairwise_cosine(tiny) == pytest.approx((0 + h + h) / 3)


# -- SLERP ---------------------------------------------------------------------------------------


def test_slerp_of_vectors_that_are_not_unit_vectors_uses_their_angle():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([3.0, 3.0])  # 45° apart, norms 2 and 4.24
    omega = math.pi / 4
    for t in (0.25, 0.5):
        want = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
        torch.testing.assert_close(K.slerp(a, b, t), want)


@pytest.mark.parametrize("swap", [False, True])
def test_slerp_falls_back_to_linear_when_a_norm_is_below_eps(swap):
    small, unit = torch.tensor([1e-4, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal: slerp ≠ lerp
    a, b = (unit, small) if swap else (small, unit)
    torch.testing.assert_close(K.slerp(a, b, 0.5), torch.lerp(a, b, 0.5))
    torch.testing.assert_close(K.slerp(a, b, 0.3), torch.lerp(a, b, 0.3))
    zero = torch.zeros(2)
    torch.testing.assert_close(K.slerp(zero, unit, 0.25), torch.tensor([0.0, 0.25]))


def test_slerp_with_a_norm_of_exactly_eps_is_spherical():
    eps = float(torch.tensor(5e-4))  # the float32 value, so that the norm equals eps exactly
    a, b = torch.tensor([eps, 0.0]), torch.tensor([0.0, eps])
    assert float(a.norm()) == eps
    h = math.sqrt(0.5) * eps
    for x, y in ((a, b), (b, a)):
        torch.testing.assert_close(K.slerp(x, y, 0.5, eps=eps), torch.tensor([h, h]))


def test_slerp_is_linear_only_when_one_minus_cos_is_strictly_below_eps():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([3.0, 3.0])
    cos = float((a @ b) / (a.norm() * b.norm()))  # as the kernel computes it
    spherical = K.slerp(a, b, 0.5, eps=1e-6)
    assert not torch.allclose(spherical, torch.lerp(a, b, 0.5))
    torch.testing.assert_close(K.slerp(a, b, 0.5, eps=1.0 - cos), spherical)
    torch.testing.assert_close(K.slerp(a, b, 0.5, eps=1.0 - cos + 1e-6), torch.lerp(a, b, 0.5))


# -- the weights, the disjoint merge, DARE's scratch buffer ----------------------------------------------------------


def test_linear_with_weights_summing_to_zero_is_their_weighted_sum():
    # nothing to divide by: the sum itself (the merge driver refuses such weights for `linear`)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -1.0])
    torch.testing.assert_close(K.linear([a, b], [1.0, -1.0]), a - b)
    torch.testing.assert_close(K.linear([a, b], [0.25, 0.75]), 0.25 * a + 0.75 * b)


def test_dare_refuses_a_scratch_buffer_it_cannot_fill_in_one_line():
    msg = "^scratch must be a contiguous float32 tensor of the task vector's shape$"
    for scratch in (torch.empty(4, 3).T, torch.empty(3, 4, dtype=torch.float64), torch.empty(12)):
        with pytest.raises(ValueError, match=msg):
            K.dare(torch.ones(3, 4), 0.5, seed=0, scratch=scratch)


def test_weighted_sums_of_half_precision_tensors_are_accumulated_in_float32():
    one, tiny = (
        torch.tensor([1.0], dtype=torch.bfloat16),
        torch.tensor([2.0**-9], dtype=torch.bfloat16),
    )
    out = K.weighted_sum([one, tiny], [1.0, 1.0])  # 1 + 2^-9 is 1 in bfloat16
    assert out.dtype == torch.float32 and out.item() == 1 + 2.0**-9


@pytest.mark.parametrize("consensus", [False, True])
def test_task_merge_scales_by_lambda_whatever_its_value(consensus):
    base, taus = torch.tensor([1.0, -1.0]), [torch.tensor([0.5, 0.25]), torch.tensor([0.5, 0.75])]
    delta = torch.tensor([1.0, 1.0]) if not consensus else torch.tensor([0.5, 0.5])
    torch.testing.assert_close(
        K.task_merge(base, taus, [1.0, 1.0], consensus=consensus), base + delta
    )
    for lam in (2.0, 0.5, 3.0):
        got = K.task_merge(base, taus, [1.0, 1.0], scale=lam, consensus=consensus)
        torch.testing.assert_close(got, base + lam * delta)


def test_drop_masks_can_be_reproduced_from_the_documented_seed():
    # SHA-256 of "seed:name:index", first 8 bytes little-endian, shifted right: then PCG64
    digest = hashlib.sha256(b"7:layers.0.weight:1").digest()
    seed = int.from_bytes(digest[:8], "little") >> 1
    assert K.tensor_seed(7, "layers.0.weight", 1) == seed < 2**63
    u = np.random.Generator(np.random.PCG64(seed)).random(20, dtype=np.float32)
    got = K.dare(torch.ones(4, 5), 0.5, K.tensor_seed(7, "layers.0.weight", 1))
    assert torch.equal(got != 0, torch.from_numpy(u >= 0.5).reshape(4, 5))


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [-1.0], [1.0, -1.0, 2.0]])
def test_kernels_refuse_a_weight_count_that_differs_from_the_models(weights):
    # positive weights take the fast disjoint merge, a negative one the masked form: both check
    taus, sign = [torch.ones(3), -torch.ones(3)], torch.ones(3)
    with pytest.raises(ValueError):
        K.disjoint_merge(taus, weights, sign)
    with pytest.raises(ValueError):
        K.weighted_sum(taus, weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trim_of_a_half_precision_task_vector_keeps_the_magnitudes_at_or_above(dtype):
    tau = torch.tensor([0.5, -0.25, 1.0, -1.0, 0.125, 0.0], dtype=dtype)
    got = K.trim(tau, 0.5)
    assert got.dtype == dtype
    assert torch.equal(got, torch.tensor([0.5, 0.0, 1.0, -1.0, 0.0, 0.0], dtype=dtype))
    assert torch.equal(tau[1], torch.tensor(-0.25, dtype=dtype))  # not in place unless asked


def test_trim_by_a_nan_threshold_keeps_nothing_and_leaves_its_input():
    tau = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(K.trim(tau, math.nan), torch.zeros(3))
    assert torch.equal(K.trim(tau, 1.0), torch.tensor([0.0, -2.0, 3.0]))
    assert torch.equal(tau, torch.tensor([0.5, -2.0, 3.0]))
    mine = tau.clone()  # in place when asked, as TIES trims its own task vectors
    K.trim(mine, math.nan, inplace=True)
    assert torch.equal(mine, torch.zeros(3))


def test_trim_of_a_float64_task_vector_is_exact_at_float64_resolution():
    # 0.1 is not a float32: entries just below it in float64 are dropped, 0.1 itself is kept
    tau = torch.tensor([0.1, 0.1 - 1e-12, -(0.1 - 1e-12), -0.1, 0.1 + 1e-12], dtype=torch.float64)
    want = torch.tensor([0.1, 0.0, 0.0, -0.1, 0.1 + 1e-12], dtype=torch.float64)
    assert torch.equal(K.trim(tau, 0.1), want)


def test_ties_model_scope_trims_task_vectors_from_a_base_that_is_not_zero():
    # τ = θ − θ_b over both float tensors: |τ| = [4,3,2,1] and [0.5,0.25]; density 0.5 keeps 4,3,2.
    # The integer buffer is copied from the base and does not count among the entries.
    base = {"a": torch.full((4,), 10.0), "b": torch.full((2,), -3.0), "n": torch.tensor([5] * 6)}
    sd = {
        "a": base["a"] + torch.tensor([4.0, -3.0, 2.0, 1.0]),
        "b": base["b"] + torch.tensor([0.5, -0.25]),
        "n": torch.tensor([1000] * 6),
    }
    out = merge_state_dicts("ties", base, [sd], {"density": 0.5, "trim_scope": "model"})
    torch.testing.assert_close(out["a"], base["a"] + torch.tensor([4.0, -3.0, 2.0, 0.0]))
    torch.testing.assert_close(out["b"], base["b"])
    assert torch.equal(out["n"], base["n"])


# -- TIES's model-wide threshold -----------------------------------------------------------------


def _exact(parts: list[torch.Tensor], k: int) -> float:
    return K.kth_largest(torch.cat([p.flatten() for p in parts]), k)


def _ranks(n: int, positives: int) -> list[int]:
    """The ranks worth checking: the top few, the middle, the edges of the positive entries."""
    picks = {1, 2, 3, 4, 5, 7, 10, n // 2, positives - 1, positives, positives + 1, n}
    return sorted(k for k in picks if 1 <= k <= n)


def _small(g):  # small magnitudes, as task vectors of fine-tuned models have (all below 1)
    return [(1e-3 * torch.randn(n, generator=g)).abs() for n in (700, 300)]


def _ties(g):  # ties and zeros: values from {0, 0.25, 0.5, 1}, a largest magnitude of exactly 1
    values = torch.tensor([0.0, 0.25, 0.5, 1.0])
    return [values[torch.randint(4, (n,), generator=g)] for n in (50, 61)]


def _zeros(g):  # half zeros, the rest spread over six orders of magnitude
    def part(n):
        spread = 10 ** (6 * torch.rand(n, generator=g) - 4)
        return torch.where(torch.rand(n, generator=g) < 0.5, 0.0, spread)

    return [part(400), part(99)]


def _all_zero(g):
    return [torch.zeros(10), torch.zeros(3)]


MAGNITUDES = {"small": _small, "ties": _ties, "zeros": _zeros, "all_zero": _all_zero}


@pytest.mark.parametrize("kind", sorted(MAGNITUDES))
def test_model_threshold_is_the_exact_kth_largest_at_every_rank(kind):
    parts = MAGNITUDES[kind](torch.Generator().manual_seed(0))
    n = sum(p.numel() for p in parts)
    positives = int(sum((p > 0).sum() for p in parts))
    for k in _ranks(n, positives):
        density = k / n  # keep_count rounds density · n back to k
        assert K.keep_count(n, density) == k
        got = model_threshold(lambda parts=parts: iter(parts), density)
        assert got == _exact(parts, k), (kind, k)
    assert model_threshold(lambda: iter(parts), 0.0) == math.inf  # keep nothing


def test_model_threshold_is_exact_at_every_rank_when_magnitudes_crowd_near_the_largest():
    # 299 magnitudes within 1e-3 of 1 and one of 1e-3: the top ranks fill the top ten buckets
    gen = torch.Generator().manual_seed(3)
    parts = [1 - 1e-3 * torch.rand(200, generator=gen), 1 - 1e-3 * torch.rand(100, generator=gen)]
    parts[1][0] = 1e-3
    for k in range(1, 301):
        assert model_threshold(lambda: iter(parts), k / 300) == _exact(parts, k), k


def test_model_threshold_reads_only_one_bucket_of_magnitudes(monkeypatch):
    # the point of the three passes: the exact selection sees one histogram bucket, not the model
    gen = torch.Generator().manual_seed(1)
    parts = [torch.exp(-10 * torch.rand(n, generator=gen)) for n in (60_000, 40_000)]
    seen: list[int] = []
    kth = topk.kth_largest

    def spy(values, k, **kw):
        seen.append(values.numel())
        return kth(values, k, **kw)

    monkeypatch.setattr(topk, "kth_largest", spy)
    for density in (0.01, 0.2, 0.5, 0.9):
        got = model_threshold(lambda: iter(parts), density)
        assert got == _exact(parts, K.keep_count(100_000, density))
    assert max(seen) <= 100  # ~1.5 entries per bucket here; the whole model is 100 000


# -- Breadcrumbs, DELLA ----------------------------------------------------------------------------


def test_breadcrumbs_band_of_one_entry_keeps_that_entry():
    tau = torch.tensor([4.0, -3.0, 2.0, 1.0])  # drop the top 1 and the bottom 2: keep -3 alone
    torch.testing.assert_close(K.middle_band(tau, 0.25, 0.5), torch.tensor([0.0, -3.0, 0.0, 0.0]))


def test_della_ranks_a_vector_as_one_row_and_a_row_of_one_gets_p():
    p = K.rank_drop_probabilities(torch.tensor([3.0, -1.0, 2.0]), 0.3, 0.2)
    torch.testing.assert_close(p, torch.tensor([0.2, 0.4, 0.3]))  # by rank: p − ε/2 ... p + ε/2
    p = K.rank_drop_probabilities(torch.tensor([[1.0, -5.0], [2.0, 0.5]]), 0.3, 0.2)
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.2], [0.2, 0.4]]))  # rows of two
    for tau in (torch.tensor([[1.0], [-7.0]]), torch.tensor([2.0]), torch.tensor(2.0)):
        p = K.rank_drop_probabilities(tau, 0.3, 0.2)  # one entry per row: no rank, p itself
        assert p.shape == tau.shape and torch.all(p == 0.3)


def test_della_ranks_tied_magnitudes_by_position():
    # ties are ranked first come first, so the probabilities do not depend on the sort used
    tau = torch.tensor([1.0, -1.0] * 16)
    p = K.rank_drop_probabilities(tau, 0.5, 0.4)
    torch.testing.assert_close(p, 0.3 + 0.4 * torch.arange(32) / 31)


def test_magprune_mask_is_numpy_pcg64_uniforms_against_p():
    # the documented stream, as DARE's: float32 uniforms of PCG64(seed), kept where u >= p_j
    u = np.random.Generator(np.random.PCG64(7)).random(12, dtype=np.float32)
    p = float(u[0])  # with ε = 0 every p_j is p, and the first uniform equals it exactly
    out = K.magprune(torch.ones(3, 4), p, 0.0, seed=7)
    assert torch.equal(out != 0, torch.from_numpy(u >= np.float32(p)).reshape(3, 4))
    assert out[0, 0] != 0  # u = p is kept


DROPS = {
    "della_linear": lambda t, seed: K.magprune(t, 0.3, 0.14, seed),
    "dare_linear": lambda t, seed: K.dare(t, 0.9, seed),
}


@pytest.mark.parametrize("method", sorted(DROPS))
def test_random_drops_through_the_registry_are_seeded_per_tensor_and_model(method):
    base = torch.zeros(5, 6)
    taus = [torch.randn(5, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    sds = [{"w": t, "v": t.clone()} for t in taus]
    got = merge_state_dicts(method, {"w": base, "v": base}, sds, {"seed": 4})
    for name in ("w", "v"):
        want = sum(DROPS[method](t, K.tensor_seed(4, name, i)) for i, t in enumerate(taus))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    assert not torch.equal(got["w"], got["v"])  # same values, another tensor: other masks
    # the kernel called alone (no model indices given) numbers the models 0, 1, ...
    spec = registry.get(f"reuse/{method}")
    alone = spec.fn(base, taus, [1.0, 1.0], spec.config.build({"seed": 4}), Ctx("w"))
    torch.testing.assert_close(alone, got["w"], rtol=0, atol=1e-6)


# -- the registered methods pass the config's values on ------------------------------------------

# Two task vectors of four entries from a base that is not zero. Elected signs: +, +, −, 0 (the
# sums are 4, 1, −3, 0). Entry 1 has models that disagree: the disjoint merge keeps τ_1's 2 alone.
_BASE = torch.tensor([1.0, -1.0, 0.5, 2.0])
_TAUS = [torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([3.0, -1.0, -2.0, 0.0])]
_DISJOINT_MEAN = torch.tensor([2.0, 2.0, -1.5, 0.0])  # over the agreeing models
_DISJOINT_SUM = torch.tensor([4.0, 2.0, -3.0, 0.0])
_SUM = torch.tensor([4.0, 1.0, -3.0, 0.0])  # task arithmetic: no sign election

# configs under which each method's sparsifier keeps every entry as it is (p = 0, an empty band)
_KEEP_ALL = {
    "dare_ties": {"drop_rate": 0.0},
    "della": {"drop_rate": 0.0, "window": 0.0},
    "breadcrumbs_ties": {"drop_top": 0.0, "drop_bottom": 0.0},
    "dare_linear": {"drop_rate": 0.0},
    "della_linear": {"drop_rate": 0.0, "window": 0.0},
}


def _merge(method: str, cfg: dict) -> torch.Tensor:
    sds = [{"w": _BASE + t} for t in _TAUS]
    return merge_state_dicts(method, {"w": _BASE}, sds, {**_KEEP_ALL[method], **cfg})["w"]


@pytest.mark.parametrize("method", ["dare_ties", "della", "breadcrumbs_ties"])
def test_ties_style_methods_elect_signs_take_the_disjoint_mean_or_sum_and_scale_by_lambda(method):
    torch.testing.assert_close(_merge(method, {"scale": 1.0}), _BASE + _DISJOINT_MEAN)
    torch.testing.assert_close(_merge(method, {"scale": 2.0}), _BASE + 2 * _DISJOINT_MEAN)
    got = _merge(method, {"scale": 0.5, "normalize": False})  # the sum over the agreeing models
    torch.testing.assert_close(got, _BASE + 0.5 * _DISJOINT_SUM)


def test_della_default_lambda_is_the_authors_1_1():
    torch.testing.assert_close(_merge("della", {}), _BASE + 1.1 * _DISJOINT_MEAN)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_linear_drop_methods_add_the_plain_sum_scaled_by_lambda(method):
    torch.testing.assert_close(_merge(method, {}), _BASE + _SUM)
    torch.testing.assert_close(_merge(method, {"scale": 3.0}), _BASE + 3 * _SUM)


@pytest.mark.parametrize("models", [(), (0,)])
def test_ties_refuses_model_thresholds_that_do_not_cover_every_task_vector(models):
    # a Ctx with model-wide thresholds but too few model indices must not leave τ_2 untrimmed
    spec = registry.get("reuse/ties")
    cfg = spec.config.build({"trim_scope": "model"})
    tensors = [_BASE + t for t in _TAUS]
    with pytest.raises(ValueError):
        spec.fn(_BASE, tensors, [1.0, 1.0], cfg, Ctx("w", {"thresholds": [2.5, 2.5]}, models))
    # with an index per tensor: |τ| ≥ 2.5 kept, i.e. 3 alone; the signs elected after trimming
    ctx = Ctx("w", {"thresholds": [2.5, 2.5]}, (0, 1))
    got = spec.fn(_BASE, tensors, [1.0, 1.0], cfg, ctx)
    torch.testing.assert_close(got, _BASE + torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_slerp_eps_from_the_config_decides_when_to_interpolate_linearly():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([3.0, 3.0])  # 45° apart: 1 − cos Ω ≈ 0.29
    sds = [{"w": a}, {"w": b}]
    omega = math.pi / 4
    spherical = (math.sin(0.75 * omega) * a + math.sin(0.25 * omega) * b) / math.sin(omega)
    torch.testing.assert_close(merge_state_dicts("slerp", None, sds, {"t": 0.25})["w"], spherical)
    linear = merge_state_dicts("slerp", None, sds, {"t": 0.25, "eps": 0.5})["w"]
    torch.testing.assert_close(linear, torch.lerp(a, b, 0.25))
    assert not torch.allclose(linear, spherical)


def test_model_stock_eps_from_the_config_floors_the_norms():
    base = torch.zeros(2)
    sds = [{"x": torch.tensor([1e-3, 0.0])}, {"x": torch.tensor([1e-3, 1e-3])}]
    mean = torch.tensor([1e-3, 0.5e-3])
    # eps = 1: both norms count as 1, cos = 1e-6, and the merge stays near the base
    got = merge_state_dicts("model_stock", {"x": base}, sds, {"eps": 1.0})["x"]
    torch.testing.assert_close(got, K.model_stock_ratio(1e-6, 2) * mean, rtol=1e-5, atol=0)
    got = merge_state_dicts("model_stock", {"x": base}, sds)["x"]  # default: cos 45°
    torch.testing.assert_close(got, K.model_stock_ratio(math.sqrt(0.5), 2) * mean)


# without a base the names are model 0's: a tensor only model 1 has is not in a SLERP merge
@pytest.mark.parametrize(
    ("method", "holder"), [("slerp", 0), ("model_stock", 0), ("model_stock", 1)]
)
def test_methods_of_several_models_copy_a_tensor_only_one_model_has_when_skipping(method, holder):
    base = {"w": torch.zeros(2)} if method == "model_stock" else None
    sds = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    own = torch.tensor([5.0, -7.0])
    sds[holder]["only"] = own
    if base is not None:
        base["only"] = torch.zeros(2)
    out = merge_state_dicts(method, base, sds, on_missing="skip")
    torch.testing.assert_close(out["only"], own)


def test_random_drops_draw_on_the_cpu_and_move_the_mask_to_the_task_vectors_device():
    """DARE's mask and DELLA's uniforms, ranks and probabilities reach a task vector on another
    device (meta here: no CPU-made tensor may meet it), as `reuse merge --device` needs."""
    meta = torch.device("meta")
    tau = torch.randn(3, 4).to(meta)
    with SameDevice():
        assert K.dare(tau, 0.5, seed=1).device == meta
        assert K.dare(tau.clone(), 0.5, seed=1, inplace=True).device == meta
        assert K.magprune(tau, 0.5, 0.2, seed=1).device == meta
        assert K.rank_drop_probabilities(tau, 0.5, 0.2).device == meta
        assert K.rank_drop_probabilities(torch.randn(3, 1).to(meta), 0.5, 0.2).device == meta
