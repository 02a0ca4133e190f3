"""Data-free meta-learning: access levels, zeroth-order gradients, inversion, the priors, the
recipe and the command."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm import registry
from lfm.access import LocalClassifier, narrow
from lfm.core.priors import bn_prior, total_variation
from lfm.errors import AccessError, LfmError
from lfm.meta import ModelPool, SinusoidTasks
from lfm.meta.baseline import train_classifier
from lfm.meta.datafree import (
    BlackBoxConfig,
    DataFreeConfig,
    datafree_blackbox,
    datafree_whitebox,
    episode_split,
    invert,
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
        datafree_whitebox(MLP(4, 8, (8,)), ModelPool([scores], (4,)), DataFreeConfig(**CFG))
    with pytest.raises(AccessError, match="SCORES"):
        datafree_blackbox(MLP(4, 8, (8,)), ModelPool([labels], (4,)), BlackBoxConfig(**CFG))
    with pytest.raises(AccessError, match="SCORES"):  # the same gate by name
        registry.run("meta/datafree_blackbox", MLP(4, 8, (8,)), ModelPool([labels], (4,)))


def test_a_pool_learner_refuses_tasks_and_a_narrowed_learner():
    m = LocalClassifier(pool_model())
    with pytest.raises(LfmError, match="learns from a ModelPool"):
        datafree_whitebox(MLP(4, 8, (8,)), SinusoidTasks(), DataFreeConfig(**CFG))
    scores = narrow(LocalClassifier(MLP(4, 8, (8,))), "scores")  # its weights are needed
    with pytest.raises(AccessError, match="WEIGHTS"):
        datafree_whitebox(scores, ModelPool([m], (4,)), DataFreeConfig(**CFG))


def test_blackbox_runs_through_scores_only_and_leaves_the_pool_alone():
    m = pool_model()
    before = {n: p.clone() for n, p in m.named_parameters()}
    handle = narrow(LocalClassifier(m), "scores")
    assert not hasattr(handle, "model")
    cfg = BlackBoxConfig(**CFG, directions=3)
    learner = MLP(4, 8, (8,))
    start = {n: p.clone() for n, p in learner.named_parameters()}
    result = datafree_blackbox(learner, ModelPool([handle], (4,)), cfg, seed=0)
    hist = result.history
    assert result.method == "meta/datafree_blackbox"
    assert hist.queries == 2 * 2 * (3 + 1) * 9 + 2 * 6  # inversion + distillation queries
    assert len(hist.loss) == 2 and all(torch.isfinite(torch.tensor(hist.loss)))
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert all(torch.equal(p, start[n]) for n, p in learner.named_parameters())  # a copy trained
    assert not torch.equal(result.model.head.weight, learner.head.weight)


def test_whitebox_sends_no_query_count():
    result = datafree_whitebox(
        LocalClassifier(MLP(4, 8, (8,))), ModelPool([LocalClassifier(pool_model())], (4,)),
        DataFreeConfig(**CFG),
    )  # fmt: skip
    assert result.history.queries == 0 and len(result.history.loss) == 2


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
    p = DataFreeConfig().tv_p
    assert p == 1  # the absolute total variation the data-free figures were measured with
    flat = torch.ones(2, 1, 4, 4)
    assert total_variation(flat, p) == 0 and total_variation(torch.rand(2, 4), p) == 0
    x = torch.rand(2, 1, 4, 4)
    dh, dw = x[..., 1:, :] - x[..., :-1, :], x[..., 1:] - x[..., :-1]
    by_hand = dh.abs().mean() + dw.abs().mean()
    assert torch.equal(total_variation(x, p), by_hand) and by_hand > 0
    y, s, q = episode_split(DataFreeConfig(ways=2, shots=1, queries=2))
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and s.tolist() == [0, 3] and q.tolist() == [1, 2, 4, 5]


def test_cli_datafree_writes_a_run(tmp_path):
    import json

    from typer.testing import CliRunner

    from lfm.cli.meta import app
    from lfm.meta.recipes import load_result

    args = ["datafree", "--method", "datafree_blackbox", "--steps", "2", "--pool", "2"]
    args += ["--pool-steps", "3", "--test-tasks", "10", "--root", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "meta/datafree_blackbox digits 1-shot: accuracy" in result.output
    (run,) = list(tmp_path.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["directions"] == 20
    assert manifest["metrics"]["pool_queries"] > 0 and manifest["metrics"]["test_n"] == 10
    assert len(manifest["history"]["meta_loss"]["value"]) == 2 and (run / "curves.png").exists()
    state, lrs, meta = load_result(run / "model.safetensors")
    assert lrs is None and meta["method"] == "meta/datafree_blackbox"
    assert state["head.weight"].shape == (64, 32)


def test_datafree_recipe_from_python(tmp_path):
    from lfm.meta import recipes

    done = recipes.datafree(
        "datafree_whitebox", steps=2, pool=2, pool_steps=3, test_tasks=10, root=tmp_path
    )
    assert done.method == "meta/datafree_whitebox" and done.score["n"] == 10
    assert done.result.history.queries == 0 and len(done.result.history.loss) == 2
    state, _, _ = recipes.load_result(done.path / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in done.result.model.state_dict().items())
    with pytest.raises(LfmError, match="lfm meta train --method maml"):
        recipes.datafree("maml", root=tmp_path)
    with pytest.raises(LfmError, match="not 'sinusoid'"):
        recipes.datafree("datafree_blackbox", "sinusoid", root=tmp_path)
