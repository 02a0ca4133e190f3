"""Logit losses pinned against hand computations, and their invariances."""

from __future__ import annotations

import math

import pytest
import torch

from lfm.distill.losses import (
    DISTConfig,
    KDConfig,
    ReverseKLConfig,
    TopKConfig,
    dist_loss,
    kd_loss,
    reverse_kl_loss,
    topk_kd_loss,
)


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


S, T = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]


def test_kd_golden_at_t2():
    got = kd_loss(torch.tensor([S]), torch.tensor([T]), KDConfig(temperature=2.0))
    want = 4 * kl(softmax(T, 2), softmax(S, 2))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert got.item() == pytest.approx(1.2806266713, rel=1e-6)


def test_reverse_kl_golden():
    got = reverse_kl_loss(torch.tensor([S]), torch.tensor([T]), ReverseKLConfig())
    assert got.item() == pytest.approx(kl(softmax(S), softmax(T)), rel=1e-6)
    assert got.item() == pytest.approx(1.1504207652, rel=1e-6)


def test_kd_is_zero_for_equal_logits_and_shift_invariant():
    z = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    assert kd_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z.log_softmax(-1) + 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_batch_mean_over_sequences():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    rows = [kd_loss(s[i, j : j + 1], t[i, j : j + 1]) for i in range(2) for j in range(3)]
    torch.testing.assert_close(kd_loss(s, t), torch.stack(rows).mean())


def test_topk_golden_renormalised():
    s, t = [0.5, 1.0, -1.0, 2.0, 0.0], [2.0, 0.0, 1.0, -1.0, 0.5]
    got = topk_kd_loss(torch.tensor([s]), torch.tensor([t]), TopKConfig(k=2, temperature=2.0))
    top = [0, 2]  # the teacher's two largest
    want = 4 * kl(softmax([t[i] for i in top], 2), softmax([s[i] for i in top], 2))
    assert got.item() == pytest.approx(want, rel=1e-5)  # float32 against float64


def test_topk_golden_residual_at_t1():
    s, t = [0.5, 1.0, -1.0, 2.0, 0.0], [2.0, 0.0, 1.0, -1.0, 0.5]
    ps, pt = softmax(s), softmax(t)
    values = torch.tensor([[math.log(pt[0]), math.log(pt[2])]])
    got = topk_kd_loss(
        torch.tensor([s]), (values, torch.tensor([[0, 2]])), TopKConfig(k=2, residual=True)
    )
    p = [pt[0], pt[2], 1 - pt[0] - pt[2]]
    q = [ps[0], ps[2], 1 - ps[0] - ps[2]]
    assert got.item() == pytest.approx(kl(p, q), rel=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_topk_equals_full_kd_when_k_is_vocab(residual):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    cfg = TopKConfig(k=6, temperature=1.0 if residual else 3.0, residual=residual)
    full = kd_loss(s, t, KDConfig(temperature=cfg.temperature))
    torch.testing.assert_close(topk_kd_loss(s, t, cfg), full, rtol=1e-4, atol=1e-5)


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_golden():
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]]
    t = [[2.0, 1.0, 0.0], [0.0, -0.5, 2.0]]
    ys, yt = [softmax(r) for r in s], [softmax(r) for r in t]
    inter = sum(1 - pearson(a, b) for a, b in zip(ys, yt, strict=True)) / 2
    cols = [([r[j] for r in ys], [r[j] for r in yt]) for j in range(3)]
    intra = sum(1 - pearson(a, b) for a, b in cols) / 3
    got = dist_loss(torch.tensor(s), torch.tensor(t), DISTConfig(beta=1.0, gamma=2.0))
    assert got.item() == pytest.approx(inter + 2 * intra, rel=1e-5)


def test_dist_zero_for_equal_logits():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    assert dist_loss(z, z).item() == pytest.approx(0.0, abs=1e-5)


def test_gradients_reach_the_student_only():
    s = torch.randn(2, 4, requires_grad=True)
    t = torch.randn(2, 4, requires_grad=True)
    for fn in (kd_loss, reverse_kl_loss, topk_kd_loss, dist_loss):
        fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
