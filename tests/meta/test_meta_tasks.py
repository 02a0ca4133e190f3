"""Episode samplers: ranges, seeds, disjoint class splits, rotations."""

from __future__ import annotations

import math

import pytest
import torch

from lfm.errors import LfmError
from lfm.meta.tasks import (
    EpisodeTasks,
    SinusoidTasks,
    rotate,
    rotated_classes,
    rotated_digit_splits,
    split_classes,
)


def test_sinusoid_ranges_shapes_and_seed():
    s = SinusoidTasks(shots=5, queries=7)
    t = s.sample(200, torch.Generator().manual_seed(3))
    assert t.xs.shape == (200, 5, 1) and t.xq.shape == (200, 7, 1)
    assert t.xs.abs().max() <= 5 and t.ys.abs().max() <= 5
    again = s.sample(200, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(t, again, strict=True))
    other = s.sample(200, torch.Generator().manual_seed(4))
    assert not torch.equal(t.xs, other.xs)


def test_sinusoid_targets_follow_one_sine_per_task():
    t = SinusoidTasks(shots=50, queries=0, x_range=(0.0, 2 * math.pi)).sample(
        3, torch.Generator().manual_seed(0)
    )
    amp = t.ys.abs().amax(dim=(1, 2))
    assert (amp <= 5).all() and (amp > 0.05).all()


def test_split_classes_disjoint_and_seeded():
    a = split_classes(list(range(20)), (10, 5, 5), seed=1)
    assert a == split_classes(list(range(20)), (10, 5, 5), seed=1)
    assert a != split_classes(list(range(20)), (10, 5, 5), seed=2)
    assert set(a[0]).isdisjoint(a[1]) and set(a[0]).isdisjoint(a[2]) and set(a[1]).isdisjoint(a[2])
    with pytest.raises(LfmError):
        split_classes(list(range(5)), (3, 2, 2))


def test_episodes_use_only_their_split_and_are_seeded():
    x = torch.arange(60.0).view(60, 1)
    y = torch.arange(60) // 6  # 10 classes; x // 6 recovers the class
    sampler = EpisodeTasks(x, y, [1, 3, 5, 7], ways=3, shots=2, queries=3)
    t = sampler.sample(5, torch.Generator().manual_seed(0))
    assert t.xs.shape == (5, 6, 1) and t.xq.shape == (5, 9, 1)
    assert set((t.xs // 6).long().unique().tolist()) <= {1, 3, 5, 7}
    assert torch.equal(t.ys[0], torch.tensor([0, 0, 1, 1, 2, 2]))
    for i in range(5):  # support and query of one label come from one class, without overlap
        for k in range(3):
            cs, cq = t.xs[i][t.ys[i] == k] // 6, t.xq[i][t.yq[i] == k] // 6
            assert len(torch.cat([cs, cq]).unique()) == 1
            assert set(t.xs[i][t.ys[i] == k].flatten().tolist()).isdisjoint(
                t.xq[i][t.yq[i] == k].flatten().tolist()
            )
    again = sampler.sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(t.xs, again.xs)


def test_rotation_makes_new_classes():
    x = torch.arange(4.0).view(1, 1, 2, 2)
    xr, yr = rotate(x, torch.tensor([1]), n_base=10)
    assert yr.tolist() == [1, 11, 21, 31]
    assert torch.equal(xr[1], torch.rot90(x[0], 1, dims=(-2, -1)))
    assert rotated_classes([0, 2], 10) == [0, 2, 10, 12, 20, 22, 30, 32]


def test_rotated_digit_splits_are_disjoint():
    train, val, test = rotated_digit_splits(ways=5, shots=1, queries=5)
    assert len(train.classes) == 24 and len(val.classes) == 8 and len(test.classes) == 8
    assert set(train.classes).isdisjoint(test.classes) and set(val.classes).isdisjoint(test.classes)
    base = lambda s: {c % 10 for c in s.classes}  # noqa: E731
    assert base(train).isdisjoint(base(test))
    t = test.sample(2, torch.Generator().manual_seed(0))
    assert t.xs.shape == (2, 5, 1, 8, 8) and t.xs.min() >= 0 and t.xs.max() <= 1
