"""The fast kernel paths (selection, fused trim, float masks) give the same floats as the plain forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm.reuse import kernels as K
from lfm.reuse import merge_state_dicts


def _taus(seed: int, n: int = 3, shape=(64, 33)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    taus = [torch.randn(shape, generator=gen) for _ in range(n)]
    taus[0][:5] = 0.0  # exact zeros: no sign, never in the agreeing set
    taus[1][3:9] = -taus[2][3:9]  # opposite entries whose sum is exactly 0: γ = 0
    taus[0][3:9] = 0.0
    for t in taus:
        t[-1] = 0.0  # a row where no model moves: γ = 0 whatever the weights
    return taus


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int64)


@pytest.mark.parametrize("k", [1, 7, 500, 2112])
def test_kth_largest_matches_kthvalue_and_leaves_input(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randint(0, 50, (2112,), generator=gen).float().reshape(64, 33)  # many ties
    before = x.clone()
    want = float(torch.kthvalue(x.flatten(), x.numel() - k + 1).values)
    assert K.kth_largest(x, k) == want
    assert torch.equal(x, before)
    assert K.kth_largest(x.clone(), k, overwrite=True) == want
    assert K.kth_largest(x.t(), k, overwrite=True) == want  # non-contiguous: reorders a copy
    assert torch.equal(x, before)
    assert K.kth_largest(x.to(torch.bfloat16), k) == want  # no NumPy dtype: torch's selection


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0, 0.7312, float("inf")])
def test_trim_keeps_exactly_the_magnitudes_at_or_above_the_threshold(dtype, threshold):
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(40, 25, generator=gen, dtype=dtype)
    tau[0, :4] = torch.tensor([1.0, -1.0, 0.1, -0.1], dtype=dtype)  # values at the threshold
    tau[1, :2] = 0.0
    got = K.trim(tau, threshold)
    want = torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
    assert torch.equal(_bits(got), _bits(want))
    mine = tau.clone()
    assert K.trim(mine, threshold, inplace=True).data_ptr() == mine.data_ptr()
    assert torch.equal(_bits(mine), _bits(want))


def test_magnitude_threshold_keeps_the_density_and_does_not_touch_tau():
    tau = torch.randn(100, 37, generator=torch.Generator().manual_seed(1))
    before = tau.clone()
    th = K.magnitude_threshold(tau, 0.2)
    assert int((tau.abs() >= th).sum()) == K.keep_count(tau.numel(), 0.2)
    assert torch.equal(tau, before)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 2.0, 1.7]])
@pytest.mark.parametrize("normalize", [True, False])
def test_disjoint_merge_equals_the_masked_form_bit_for_bit(weights, normalize):
    taus = _taus(0)
    sign = K.elect_sign(taus, weights)
    assert (sign == 0).any()
    before = [t.clone() for t in taus]
    got = K.disjoint_merge(taus, weights, sign, normalize)
    want = K._disjoint_merge_masked(taus, weights, sign, normalize)
    assert torch.equal(_bits(got), _bits(want))
    assert all(torch.equal(t, b) for t, b in zip(taus, before, strict=True))


def test_disjoint_merge_with_negative_weight_takes_the_masked_form():
    taus, weights = _taus(1), [1.0, -0.5, 2.0]
    sign = K.elect_sign(taus, weights)
    got = K.disjoint_merge(taus, weights, sign)
    # by hand, one coordinate: models agreeing with γ, their weighted mean
    j = 20
    agree = [i for i in range(3) if torch.sign(taus[i].flatten()[j]) == sign.flatten()[j]]
    num = sum(weights[i] * float(taus[i].flatten()[j]) for i in agree)
    den = sum(weights[i] for i in agree)
    assert float(got.flatten()[j]) == pytest.approx(num / den if den else 0.0, rel=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_dare_inplace_equals_copy_and_rescales_exactly(p):
    tau = torch.randn(200, 50, generator=torch.Generator().manual_seed(2))
    copy = K.dare(tau, p, seed=7)
    mine = tau.clone()
    inplace = K.dare(mine, p, seed=7, inplace=True)
    assert torch.equal(copy, inplace)
    kept = copy != 0
    torch.testing.assert_close(copy[kept], tau[kept] / (1 - p), rtol=0, atol=0)
    if p:
        assert abs(1 - kept.float().mean().item() - p) < 0.02
        assert inplace.data_ptr() == mine.data_ptr()  # no copy made


def test_task_merge_does_not_change_its_inputs():
    base = torch.randn(10, 3)
    taus = _taus(3, shape=(10, 3))
    before = [t.clone() for t in (base, *taus)]
    out = K.task_merge(base, taus, [1.0, 1.0, 1.0], scale=0.5, consensus=True)
    assert all(torch.equal(t, b) for t, b in zip((base, *taus), before, strict=True))
    sign = K.elect_sign(taus, [1.0] * 3)
    torch.testing.assert_close(out, base + 0.5 * K.disjoint_merge(taus, [1.0] * 3, sign))


def test_dare_with_a_reused_scratch_buffer_draws_the_same_masks():
    gen = torch.Generator().manual_seed(3)
    taus = [torch.randn(64, 33, generator=gen) for _ in range(3)]
    scratch = torch.full((64, 33), float("nan"))
    for i, tau in enumerate(taus):
        fresh = K.dare(tau, 0.8, seed=K.tensor_seed(0, "w", i))
        reused = K.dare(
            tau.clone(), 0.8, seed=K.tensor_seed(0, "w", i), inplace=True, scratch=scratch
        )
        assert torch.equal(fresh, reused)
    torch.testing.assert_close(scratch, (scratch != 0).float())  # it held the last 0/1 mask
    # the registered merge shares one buffer across models and still gives the same merge
    sds = [{"w": t} for t in taus[1:]]
    got = merge_state_dicts("dare_linear", {"w": taus[0]}, sds, {"drop_rate": 0.8, "seed": 5})["w"]
    want = taus[0] + sum(
        K.dare(t - taus[0], 0.8, K.tensor_seed(5, "w", i)) for i, t in enumerate(taus[1:])
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dare_mask_is_numpy_pcg64_uniforms_against_p():
    # the documented stream: float32 uniforms of PCG64(seed), kept where u >= p
    tau = torch.ones(7, 9)
    want = np.random.Generator(np.random.PCG64(12345)).random(63, dtype=np.float32) >= 0.6
    got = K.dare(tau, 0.6, seed=12345)
    assert torch.equal(got != 0, torch.from_numpy(want).reshape(7, 9))
    with pytest.raises(ValueError, match="contiguous float32"):
        K.dare(tau, 0.6, seed=1, scratch=torch.empty(9, 7).T)
