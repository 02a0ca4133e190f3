"""The shared training loop: it learns, accumulation equals a big batch, resume is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.core.train import TrainConfig, shuffled_batches, train
from lfm.runs import Run


class DropMLP(nn.Module):
    """A small regressor with dropout, so that a resumed run must restore the RNG."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


CFG = TrainConfig(steps=12, lr=1e-2, progress=False)


def test_loss_decreases():
    x, y = _data()
    hist = train(DropMLP(), mse, shuffled_batches(x, y, batch_size=16), CFG.replace(steps=60))
    assert len(hist.losses) == 60
    assert sum(hist.losses[-5:]) / 5 < 0.3 * sum(hist.losses[:5]) / 5


def test_accumulation_equals_big_batch():
    x, y = _data(32)
    big, small = nn.Linear(4, 1), nn.Linear(4, 1)
    small.load_state_dict(big.state_dict())
    train(big, mse, [(x, y)], CFG.replace(steps=3))
    micro = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    train(small, mse, micro, CFG.replace(steps=3, grad_accum=4))
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_evaluation_and_metrics_logged(tmp_path):
    x, y = _data()
    run = Run("t", root=tmp_path)
    cfg = CFG.replace(steps=6, eval_every=3)
    hist = train(
        DropMLP(), mse, shuffled_batches(x, y, batch_size=16), cfg, run, lambda m: {"val": 1.5}
    )
    assert [e["step"] for e in hist.evals] == [3, 6]
    assert run.manifest["metrics"]["step"] == 6 and run.manifest["metrics"]["val"] == 1.5


class Interrupt(Exception):
    pass


def _stopping(after: int):
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] > after:
            raise Interrupt
        return mse(model, batch)

    return fn


def test_resume_matches_uninterrupted_run(tmp_path):
    x, y = _data()
    cfg = CFG.replace(steps=10, ckpt_every=4, grad_accum=2)
    full = DropMLP()
    train(full, mse, shuffled_batches(x, y, batch_size=8), cfg, Run("a", root=tmp_path))
    run = Run("b", root=tmp_path)
    with pytest.raises(Interrupt):  # dies during step 7, after the checkpoint at step 4
        train(DropMLP(), _stopping(13), shuffled_batches(x, y, batch_size=8), cfg, run)
    resumed = DropMLP(seed=5)  # a different init: the weights must come from the checkpoint
    hist = train(resumed, mse, shuffled_batches(x, y, batch_size=8), cfg, Run("b", path=run.path))
    assert hist.start_step == 4 and len(hist.losses) == 10
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = torch.load(run.path / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 10
