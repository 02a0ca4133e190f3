"""Data-free meta-learning: access levels, zeroth-order gradients, inversion, the priors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm.access import LocalClassifier, narrow
from lfm.errors import AccessError
from lfm.meta.baseline import train_classifier
from lfm.meta.datafree import (
    BlackBoxConfig,
    DataFreeConfig,
    blackbox,
    bn_prior,
    episode_split,
    invert,
    total_variation,
    whitebox,
    whitebox_grad,
    zeroth_order_grad,
)
from lfm.meta.models import MLP, ConvNet

CFG = {"steps": 2, "ways": 3, "shots": 1, "queries": 2, "inv_steps": 2}


def pool_model(seed: int = 0) -> MLP:
    """A 3-way MLP trained on three Gaussian blobs inside [0, 1]^4."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(20)
    x = (torch.rand(3, 4, generator=gen)[y] + 0.05 * torch.randn(60, 4, generator=gen)).clamp(0, 1)
    torch.manual_seed(seed)
    return train_classifier(MLP(4, 3, (16,)), x, y, steps=100, lr=1e-2)


def test_access_levels_are_enforced():
    m = pool_model()
    scores, labels = narrow(LocalClassifier(m), "scores"), narrow(LocalClassifier(m), "text")
    with pytest.raises(AccessError, match="WEIGHTS"):
        whitebox([scores], MLP(4, 8, (8,)), (4,), DataFreeConfig(**CFG))
    with pytest.raises(AccessError, match="SCORES"):
        blackbox([labels], MLP(4, 8, (8,)), (4,), BlackBoxConfig(**CFG))


def test_blackbox_runs_through_scores_only_and_leaves_the_pool_alone():
    m = pool_model()
    before = {n: p.clone() for n, p in m.named_parameters()}
    handle = narrow(LocalClassifier(m), "scores")
    assert not hasattr(handle, "model")
    cfg = BlackBoxConfig(**CFG, directions=3)
    _, hist = blackbox([handle], MLP(4, 8, (8,)), (4,), cfg, seed=0)
    assert hist.queries == 2 * 2 * (3 + 1) * 9 + 2 * 6  # inversion + distillation queries
    assert len(hist.loss) == 2 and all(torch.isfinite(torch.tensor(hist.loss)))
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_zeroth_order_estimate_points_along_the_true_gradient():
    m = pool_model()
    z, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = BlackBoxConfig(directions=2000, mu=1e-3)
    est = zeroth_order_grad(cfg, torch.Generator().manual_seed(0))(
        narrow(LocalClassifier(m), "scores"), z, y
    )
    true = whitebox_grad(DataFreeConfig(bn=0.0))(LocalClassifier(m), z, y)
    assert F.cosine_similarity(est.flatten(), true.flatten(), dim=0) > 0.8


@pytest.mark.parametrize("black", [False, True])
def test_inversion_makes_the_pool_model_predict_the_episode_labels(black):
    m = pool_model()
    cfg = (BlackBoxConfig if black else DataFreeConfig)(
        **{**CFG, "inv_steps": 60, "inv_lr": 0.2, "adv": 0.0}
    )
    gen = torch.Generator().manual_seed(0)
    oracle = zeroth_order_grad(cfg, gen) if black else whitebox_grad(cfg)
    handle = LocalClassifier(m)
    y = episode_split(cfg)[0]
    z0 = torch.randn(len(y), 4, generator=gen)
    learner = MLP(4, 8, (8,))
    z = invert(oracle, handle, z0, learner, dict(learner.named_parameters()), cfg)
    acc = lambda z: (m(torch.sigmoid(z)).argmax(-1) == y).float().mean()  # noqa: E731
    assert acc(z) >= 0.85 and acc(z) > acc(z0)


def test_bn_prior_prefers_inputs_like_the_training_data():
    torch.manual_seed(0)
    net = ConvNet(3, 4, 2, 8, running=True)
    data = torch.rand(64, 1, 8, 8) * 0.3
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average of the batches seen
    with torch.no_grad():
        for chunk in data.split(16):
            net(chunk)
    net.eval()
    _, near = bn_prior(net, data[:16])
    _, far = bn_prior(net, torch.rand(16, 1, 8, 8))
    assert near < 0.5 * far
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed


def test_total_variation_and_episode_split():
    flat = torch.ones(2, 1, 4, 4)
    assert total_variation(flat) == 0 and total_variation(torch.rand(2, 4)) == 0
    assert total_variation(torch.rand(2, 1, 4, 4)) > 0
    y, s, q = episode_split(DataFreeConfig(ways=2, shots=1, queries=2))
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and s.tolist() == [0, 3] and q.tolist() == [1, 2, 4, 5]


def test_cli_datafree_writes_a_run(tmp_path):
    import json

    from typer.testing import CliRunner

    from lfm.cli.meta import app

    args = ["datafree", "--access", "scores", "--steps", "2", "--pool", "2", "--pool-steps", "3"]
    result = CliRunner().invoke(app, [*args, "--test-tasks", "10", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["directions"] == 20
    assert manifest["metrics"]["pool_queries"] > 0 and manifest["metrics"]["test_n"] == 10
    assert (run / "model.pt").exists()
