"""Skew KL (DistiLLM): KL(p ‖ α p + (1 − α) q), checked by hand and against its limits, at a
temperature other than 1, and on outputs of any leading shape (rows of the last dimension)."""

from __future__ import annotations

import math

import pytest
import torch

from lfm.distill.losses import KDConfig, kd_loss
from lfm.distill.skew import SkewKLConfig, skew_kl_loss


def test_matches_a_hand_computation():
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.1, 0.3, 0.6])
    m = 0.1 * p + 0.9 * q
    want = float((p * (p / m).log()).sum())
    got = skew_kl_loss(q.log()[None], p.log()[None], SkewKLConfig(alpha=0.1))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_alpha_zero_is_forward_kl_and_the_skew_bounds_it():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, generator=g) * 5, torch.randn(4, 7, generator=g) * 5
    kl = kd_loss(s, t, KDConfig(temperature=1.0))
    assert skew_kl_loss(s, t, SkewKLConfig(alpha=0.0)).item() == pytest.approx(kl.item(), rel=1e-5)
    skew = skew_kl_loss(s, t, SkewKLConfig(alpha=0.1)).item()
    assert skew < kl.item() and skew <= math.log(1 / 0.1) + 1e-6


def test_the_gradient_stays_bounded_where_the_student_has_no_mass():
    t = torch.tensor([[0.0, 0.0, 0.0]])  # the teacher likes every token equally
    s = torch.tensor([[30.0, -30.0, -30.0]], requires_grad=True)  # the student has one
    skew_kl_loss(s, t, SkewKLConfig(alpha=0.1)).backward()
    g_skew = s.grad.abs().max().item()
    s.grad = None
    kd_loss(s, t, KDConfig(temperature=1.0)).backward()
    assert g_skew < s.grad.abs().max().item()


def test_trains_a_student_through_a_scores_handle_by_name():
    from lfm import registry
    from lfm.access import Access

    spec = registry.get("distill/skew_kl")
    ex = spec.example(Access.SCORES, 0)
    result = registry.run("distill/skew_kl", *ex.args, cfg=ex.cfg, **ex.kwargs)
    assert len(result.history.losses) == 3 and all(math.isfinite(v) for v in result.history.losses)


def _tempered(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_at_temperature_two_both_sides_are_softened_and_the_loss_scaled_by_t_squared():
    s, t = [1.0, 2.0, 3.0, -1.0], [3.0, 2.0, 0.5, 1.0]
    p, q = _tempered(t, 2), _tempered(s, 2)
    m = [0.1 * a + 0.9 * b for a, b in zip(p, q, strict=True)]
    want = 4 * sum(a * math.log(a / b) for a, b in zip(p, m, strict=True))
    got = skew_kl_loss(torch.tensor([s]), torch.tensor([t]), SkewKLConfig(temperature=2.0))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_outputs_of_any_leading_shape_are_rows_of_the_last_dimension():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)  # (B, T, V)
    rows = [skew_kl_loss(s[i, j : j + 1], t[i, j : j + 1]) for i in range(2) for j in range(3)]
    torch.testing.assert_close(skew_kl_loss(s, t), torch.stack(rows).mean())
    torch.testing.assert_close(skew_kl_loss(s[0, 0], t[0, 0]), rows[0])  # one row (V,)
