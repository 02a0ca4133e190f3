"""The shared training loop: it learns, accumulation equals a big batch, resume is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.config import Config
from lfm.core.train import TrainConfig, param_groups, shuffled_batches, train
from lfm.errors import ConfigError
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


@pytest.mark.parametrize("groups", [{}, {r"^net\.3\.": 3e-2}])
def test_resume_matches_uninterrupted_run(tmp_path, groups):
    x, y = _data()
    cfg = CFG.replace(steps=10, ckpt_every=4, grad_accum=2, lr_groups=groups)
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


def test_lr_groups_first_step_moves_each_group_by_its_lr():
    # AdamW's first step is lr·g/(|g| + eps) per element: a move of (almost exactly) lr where g ≠ 0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = CFG.replace(
        steps=1, lr=1e-3, weight_decay=0.0, lr_groups={r"^1\.weight$": 0.1, r"^1\.": 0.2}
    )
    train(model, mse, [_data(16)], cfg)
    moved = [(p - b).abs() for p, b in zip(model.parameters(), before, strict=True)]
    for m, lr in zip(moved, (1e-3, 1e-3, 0.1, 0.2), strict=True):  # 0.w, 0.b, 1.w, 1.b
        torch.testing.assert_close(m[m > 0], torch.full_like(m[m > 0], lr), rtol=1e-4, atol=0)
        assert (m > 0).any()


def test_lr_groups_split_the_trainable_parameters_in_order():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    model[0].bias.requires_grad_(False)
    groups = param_groups(model, TrainConfig(lr=1e-3, lr_groups={"bias": 5e-2, "weight": 1e-2}))
    assert [(g["lr"], len(g["params"])) for g in groups] == [(5e-2, 1), (1e-2, 2)]
    assert groups[0]["params"][0] is model[1].bias


def test_lr_groups_refuse_a_pattern_that_matches_nothing_trainable():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    model[1].requires_grad_(False)
    for pattern in ("head", r"^1\."):  # absent, and present but frozen
        with pytest.raises(ConfigError, match="match no trainable parameter") as e:
            param_groups(model, TrainConfig(lr_groups={pattern: 1e-2}))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a regular expression"):
        TrainConfig.build({"lr_groups": {"(": 1e-2}})
    with pytest.raises(ConfigError, match="must be > 0"):
        TrainConfig.build({"lr_groups": {"x": 0}})


def test_lr_groups_round_trip_with_yaml_strings():
    cfg = TrainConfig.build({"lr_groups": {"^head\\.": "1e-3"}})
    assert cfg.lr_groups == {"^head\\.": 1e-3}
    assert TrainConfig.build(cfg.to_dict()) == cfg and isinstance(cfg, Config)


def test_a_lora_checkpoint_holds_the_adapter_not_the_base_model(tmp_path):
    from safetensors.torch import load_file

    from lfm.registry import run
    from lfm.tuning.tiny import tiny_news_lm, tiny_task

    tcfg = TrainConfig(steps=2, lr=1e-2, ckpt_every=2, progress=False)
    res = run("tuning/lora", tiny_news_lm(0), tiny_task(), train_cfg=tcfg,
              run=Run("l", path=tmp_path), batch_size=3)  # fmt: skip
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert saved and set(saved) <= trainable | {n for n, _ in res.model.named_buffers()}
    assert trainable <= set(saved) and all("lora_" in n for n in trainable)
    assert (
        sum(t.numel() for t in saved.values()) < sum(p.numel() for p in res.model.parameters()) / 10
    )
