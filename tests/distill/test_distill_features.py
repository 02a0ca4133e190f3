"""Feature losses pinned against explicit formulas, and their invariances; AT's pooling of either
larger map and its exponent on both maps, and RKD's float32 result for any feature dtype."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lfm.distill.features import (
    ATConfig,
    HintProjector,
    PKTConfig,
    RKDConfig,
    at_loss,
    fitnets_loss,
    pkt_loss,
    rkd_angle,
    rkd_distance,
    rkd_loss,
)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_fitnets_golden_and_projector_shapes():
    s, t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert fitnets_loss(s, t).item() == pytest.approx((1 + 0 + 1 + 4) / 4)
    proj = HintProjector(torch.Size([2, 3, 8, 8]), torch.Size([2, 5, 4, 4]))
    assert proj(torch.randn(2, 3, 8, 8)).shape == (2, 5, 4, 4)
    assert HintProjector(torch.Size([2, 3]), torch.Size([2, 7]))(torch.randn(2, 3)).shape == (2, 7)


def test_at_golden():
    s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    t = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]]])  # (1, 1, 2, 2): channel counts differ
    qs = [2.0, 1.0, 0.0, 1.0]  # Σ_c a²
    qs = [v / math.sqrt(6) for v in qs]
    qt = [0.0, 1.0, 0.0, 0.0]
    want = 1000 / 2 * sum((a - b) ** 2 for a, b in zip(qs, qt, strict=True)) / 4
    assert at_loss(s, t, ATConfig()).item() == pytest.approx(want, rel=1e-5)


def test_at_invariant_to_feature_scale_and_pools_sizes():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    torch.testing.assert_close(at_loss(3 * s, t), at_loss(s, t))
    assert at_loss(torch.randn(2, 3, 8, 8, generator=g), t).isfinite()


POINTS_S = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
POINTS_T = [[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]


def _psi_d(points: list[list[float]]) -> dict[tuple[int, int], float]:
    d = {(i, j): math.dist(points[i], points[j]) for i, j in itertools.permutations(range(3), 2)}
    mu = sum(d.values()) / len(d)
    return {k: v / mu for k, v in d.items()}


def test_rkd_distance_golden():
    ds, dt = _psi_d(POINTS_S), _psi_d(POINTS_T)
    want = sum(huber(ds[k] - dt[k]) for k in ds) / len(ds)
    got = rkd_distance(torch.tensor(POINTS_S), torch.tensor(POINTS_T))
    assert got.item() == pytest.approx(want, rel=1e-5)


def _cos(points: list[list[float]], i: int, j: int, k: int) -> float:
    if i == j or k == j:
        return 0.0  # a zero edge vector has no direction
    u = [a - b for a, b in zip(points[i], points[j], strict=True)]
    v = [a - b for a, b in zip(points[k], points[j], strict=True)]
    return sum(a * b for a, b in zip(u, v, strict=True)) / (math.hypot(*u) * math.hypot(*v))


def test_rkd_angle_golden_and_total():
    triples = list(itertools.product(range(3), repeat=3))
    want = sum(huber(_cos(POINTS_S, *x) - _cos(POINTS_T, *x)) for x in triples) / len(triples)
    s, t = torch.tensor(POINTS_S), torch.tensor(POINTS_T)
    assert rkd_angle(s, t).item() == pytest.approx(want, rel=1e-5)
    total = rkd_loss(s, t, RKDConfig())
    assert total.item() == pytest.approx(25 * rkd_distance(s, t).item() + 50 * want, rel=1e-5)


def test_rkd_invariant_to_scaling_embeddings():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    torch.testing.assert_close(rkd_distance(7.5 * s, t), rkd_distance(s, t))
    torch.testing.assert_close(rkd_loss(s, 0.1 * t), rkd_loss(s, t))
    assert rkd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def _pkt_p(points: list[list[float]]) -> list[list[float]]:
    n = len(points)

    def k(i: int, j: int) -> float:
        a, b = points[i], points[j]
        cos = sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))
        return (cos + 1) / 2

    return [
        [k(i, j) / sum(k(i, m) for m in range(n) if m != i) for j in range(n)] for i in range(n)
    ]


def test_pkt_golden():
    s, t = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0], [-1.0, 1.0]]
    ps, pt = _pkt_p(s), _pkt_p(t)
    rows = [
        sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for j in range(3) if j != i) for i in range(3)
    ]
    got = pkt_loss(torch.tensor(s), torch.tensor(t), PKTConfig())
    assert got.item() == pytest.approx(sum(rows) / 3, rel=1e-4)
    assert pkt_loss(torch.tensor(t), torch.tensor(t)).item() == pytest.approx(0.0, abs=1e-6)


# -- what mutation testing found untested: AT pools whichever map is larger (golden values both
# ways round), AT's exponent p reaches both maps, and RKD's loss is float32 for any input dtype


def _at_want(qs: list[float], qt: list[float], beta: float = 1000.0) -> float:
    """β/2 · mean over positions of (q_s/‖q_s‖ − q_t/‖q_t‖)², from the raw maps Σ_c |a|^p."""
    ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
    return beta / 2 * sum((a / ns - b / nt) ** 2 for a, b in zip(qs, qt, strict=True)) / len(qs)


def test_at_pools_the_larger_map_to_the_smaller_size_whichever_side_it_is():
    small = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]]])  # (1, 1, 2, 2): Σ_c a² = 1, 4, 0, 9
    # (1, 1, 4, 4) whose 2×2 blocks average to [[1, 0], [2, 1]]: Σ_c a² = 1, 0, 4, 1
    big = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                          [4.0, 0.0, 1.0, 1.0], [0.0, 4.0, 1.0, 1.0]]]])  # fmt: skip
    want = _at_want([1.0, 4.0, 0.0, 9.0], [1.0, 0.0, 4.0, 1.0])
    assert at_loss(small, big).item() == pytest.approx(want, rel=1e-5)  # the teacher's pooled
    assert at_loss(big, small).item() == pytest.approx(want, rel=1e-5)  # the student's pooled


def test_at_takes_the_exponent_p_on_both_maps():
    # p = 1: Q = Σ_c |a|. Student channels [[2, 0], [0, 1]] and [[-1, 1], [0, 0]]: 3, 1, 0, 1
    # (p = 2 would give 5, 1, 0, 1); teacher [[0, 2], [1, 0]]: 0, 2, 1, 0 (p = 2: 0, 4, 1, 0)
    s = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[-1.0, 1.0], [0.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.0], [1.0, 0.0]]]])
    want = _at_want([3.0, 1.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0], beta=10.0)
    assert at_loss(s, t, ATConfig(p=1.0, beta=10.0)).item() == pytest.approx(want, rel=1e-5)


def test_rkd_loss_is_a_float32_scalar_whatever_the_features_dtype():
    """Like the other feature losses (computed on `.float()` features): a float64 or bfloat16
    student gives a float32 loss, also when both weights are 0 (nothing is added)."""
    s, t = torch.tensor(POINTS_S), torch.tensor(POINTS_T)
    want = rkd_loss(s, t).item()
    for dtype in (torch.float64, torch.bfloat16):
        got = rkd_loss(s.to(dtype), t.to(dtype))
        assert got.dtype == torch.float32 and got.shape == ()
        assert got.item() == pytest.approx(want, rel=1e-2)
        off = rkd_loss(s.to(dtype), t.to(dtype), RKDConfig(distance_weight=0, angle_weight=0))
        assert off.dtype == torch.float32 and off.item() == 0.0


def test_at_pools_each_dimension_to_the_smaller_of_the_two_maps():
    """A 2×8 and a 4×4 map meet at 2×4: the student's width and the teacher's height are pooled
    (neither map is stretched)."""
    from lfm.distill.features import ATConfig, at_loss, attention_map

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 5, 4, 4, generator=g)
    s_pooled = s.view(1, 3, 2, 4, 2).mean(-1)  # pairs of columns
    t_pooled = t.view(1, 5, 2, 2, 4).mean(-2)  # pairs of rows
    diff = attention_map(s_pooled, 2.0) - attention_map(t_pooled, 2.0)
    want = ATConfig().beta / 2 * diff.pow(2).mean()
    assert torch.allclose(at_loss(s, t), want, atol=1e-6)
    assert torch.allclose(at_loss(t, s), ATConfig().beta / 2 * (-diff).pow(2).mean(), atol=1e-6)
