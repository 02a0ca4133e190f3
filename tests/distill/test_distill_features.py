"""Feature losses pinned against explicit formulas, and their invariances."""

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
