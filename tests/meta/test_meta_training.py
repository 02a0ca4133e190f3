"""End to end: meta-training helps; every method runs by its name (also with a subclass of its
config) and meta-tests the way it adapts; the recipe and the command write a run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lfm import registry
from lfm.access import LocalClassifier, narrow
from lfm.core.runs import path_sha256
from lfm.errors import AccessError, ConfigError, LfmError
from lfm.meta import (
    FOMAMLConfig,
    MAMLConfig,
    ModelPool,
    ProtoNetsConfig,
    SinusoidTasks,
    maml,
    meta_test,
    protonets,
)
from lfm.meta.models import MLP
from lfm.meta.tasks import EpisodeTasks
from lfm.registry import methods


def test_short_maml_run_beats_no_meta_training():
    torch.manual_seed(0)
    model = MLP(1, 1, (40, 40))
    cfg = MAMLConfig(steps=150, meta_batch=10, outer_lr=3e-3)
    result = maml(model, SinusoidTasks(5, 10), cfg, seed=0)
    test = SinusoidTasks(5, 50)
    before = meta_test(model, test, "maml", cfg, n_tasks=200)
    after = meta_test(result, test, cfg=cfg, n_tasks=200)
    assert after["mean"] + after["ci95"] < before["mean"] - before["ci95"]
    assert before["metric"] == "mse" and after["n"] == 200
    assert not torch.equal(
        model.head.weight, result.model.head.weight
    )  # the caller's model is untouched


def test_meta_test_reports_a_95_percent_interval():
    torch.manual_seed(0)
    model, cfg = MLP(1, 1, (8,)), MAMLConfig()
    r = meta_test(model, SinusoidTasks(5, 10), "maml", cfg, n_tasks=50, chunk=20)
    assert r["n"] == 50 and r["ci95"] > 0
    assert r == meta_test(model, SinusoidTasks(5, 10), "maml", cfg, n_tasks=50, chunk=20)
    with pytest.raises(LfmError, match="needs the method"):
        meta_test(model, SinusoidTasks(5, 10), n_tasks=5)


META = methods("meta")


@pytest.mark.parametrize("spec", META, ids=lambda s: s.key)
def test_every_example_meta_trains_with_finite_losses(spec):
    ex = spec.example(spec.access, 0)
    result = registry.run(spec.key, *ex.args, cfg=ex.cfg, **ex.kwargs)
    assert result.method == spec.key and len(result.history.loss) == ex.cfg.steps
    assert torch.isfinite(torch.tensor(result.history.loss)).all()
    assert "predict" in spec.extras  # meta_test finds how the method adapts by its name


def test_every_method_of_the_issue_is_registered():
    names = {s.name for s in META}
    assert {"maml", "fomaml", "anil", "metasgd", "reptile", "protonets", "pretrain"} <= names
    assert {"datafree_whitebox", "datafree_blackbox"} <= names


def _blob_episodes(seed: int = 0) -> EpisodeTasks:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(6).repeat_interleave(5)
    x = torch.randn(6, 4, generator=gen)[y] * 3 + torch.randn(30, 4, generator=gen)
    return EpisodeTasks(x, y, range(6), ways=3, shots=2, queries=2)


def test_a_subclassed_config_runs_its_method():
    class MyProtoNets(ProtoNetsConfig):  # a user's config, e.g. with a doc or a validator
        pass

    tasks = _blob_episodes()
    torch.manual_seed(0)
    model = MLP(4, 3, (8,))
    mine = registry.run("meta/protonets", model, tasks, cfg=MyProtoNets(steps=3))
    ref = protonets(model, tasks, ProtoNetsConfig(steps=3))
    assert mine.method == "meta/protonets" and mine.history.loss == ref.history.loss
    assert torch.equal(mine.model.head.weight, ref.model.head.weight)
    assert meta_test(mine, tasks, n_tasks=8) == meta_test(ref, tasks, n_tasks=8)

    class MyMAML(MAMLConfig):
        pass

    sines = SinusoidTasks(3, 3)
    a = maml(MLP(1, 1, (8,)), sines, MyMAML(steps=2, meta_batch=2))
    assert a.method == "meta/maml" and len(a.history.loss) == 2
    with pytest.raises(ConfigError, match="takes a MAMLConfig, not a FOMAMLConfig"):
        maml(MLP(1, 1, (8,)), sines, FOMAMLConfig())


def test_meta_test_adapts_the_way_the_named_method_does():
    tasks = _blob_episodes()
    torch.manual_seed(0)
    result = protonets(MLP(4, 3, (8,)), tasks, {"steps": 5})
    by_result = meta_test(result, tasks, n_tasks=20)
    by_name = meta_test(result.model, tasks, "protonets", n_tasks=20)
    assert by_result == by_name
    # the same weights adapted by MAML's gradient steps score differently from prototypes
    assert meta_test(result.model, tasks, "maml", n_tasks=20) != by_name
    with pytest.raises(ConfigError, match="takes a ProtoNetsConfig"):
        meta_test(result, tasks, cfg=MAMLConfig(), n_tasks=2)


def test_learners_take_a_classifier_handle_and_leave_it_alone():
    torch.manual_seed(0)
    net = MLP(1, 1, (8,))
    before = net.head.weight.clone()
    result = maml(LocalClassifier(net), SinusoidTasks(3, 3), {"steps": 2, "meta_batch": 2})
    assert torch.equal(net.head.weight, before) and result.model is not net
    with pytest.raises(AccessError, match=r"meta/maml needs WEIGHTS access.*only SCORES"):
        maml(narrow(LocalClassifier(net), "scores"), SinusoidTasks(3, 3))
    with pytest.raises(LfmError, match="not from a ModelPool"):
        maml(net, ModelPool([LocalClassifier(net)], (1,)))


def test_recipe_train_from_python_saves_weights_and_step_sizes(tmp_path):
    from lfm.meta import recipes

    done = recipes.train("metasgd", steps=3, meta_batch=2, test_tasks=10, root=tmp_path)
    assert done.method == "meta/metasgd" and done.score["metric"] == "mse"
    state, lrs, meta = recipes.load_result(done.path / "model.safetensors")
    assert meta["method"] == "meta/metasgd"
    assert all(torch.equal(state[k], v) for k, v in done.result.model.state_dict().items())
    assert lrs is not None and lrs.keys() == done.result.history.inner_lrs.keys()
    assert all(torch.equal(lrs[k], v) for k, v in done.result.history.inner_lrs.items())
    with pytest.raises(LfmError, match="lfm meta datafree --method datafree_whitebox"):
        recipes.train("datafree_whitebox", root=tmp_path)


def test_cli_train_writes_a_run(tmp_path):
    from lfm.cli.meta import app

    cfg = tmp_path / "fomaml.yaml"
    cfg.write_text("test_inner_steps: 2\n")
    args = ["train", "--method", "fomaml", "--steps", "5", "--test-tasks", "20", "--config",
            str(cfg)]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "meta/fomaml sinusoid 5-shot: mse" in result.output
    (run,) = list((tmp_path / "runs").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["first_order"] is True
    assert manifest["config"]["test_inner_steps"] == 2
    assert manifest["inputs"]["config"]["sha256"] == path_sha256(cfg)
    assert manifest["metrics"]["test_metric"] == "mse" and manifest["metrics"]["test_n"] == 20
    assert manifest["outputs"] == ["checkpoint", "curves.png", "model.safetensors"]
    assert all((run / name).exists() for name in manifest["outputs"])
    assert len(manifest["history"]["meta_loss"]["value"]) == 5  # one meta-loss per update


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--method", "mamll"], "did you mean 'maml'"),
        (["train", "--task", "omniglot"], "unknown task 'omniglot'"),
        (["train", "--method", "datafree_blackbox"], "lfm meta datafree"),
        (["datafree", "--method", "reptile"], "lfm meta train --method reptile"),
        (["train", "--config", "/nonexistent.yaml"], "cannot read config"),
        (["train", "--steps", "-1"], "steps must be at least 0"),
        (["train", "--shots", "0"], "shots must be at least 1"),
        (["datafree", "--pool", "0"], "pool must be at least 1"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args, message):
    from lfm.cli.meta import app

    result = CliRunner().invoke(app, [*args, "--root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not list(tmp_path.iterdir())  # refused before a run directory was made
