"""End to end: meta-training helps, the registry contract holds for every meta method, the CLI runs."""

from __future__ import annotations

import json

import pytest
import torch

from lfm.errors import ConfigError
from lfm.meta import MAMLConfig, SinusoidTasks, meta_test, meta_train
from lfm.meta.models import MLP
from lfm.registry import methods


def test_short_maml_run_beats_no_meta_training():
    torch.manual_seed(0)
    model = MLP(1, 1, (40, 40))
    cfg = MAMLConfig(steps=150, meta_batch=10, outer_lr=3e-3)
    trained, _ = meta_train(model, SinusoidTasks(5, 10), cfg, seed=0)
    test = SinusoidTasks(5, 50)
    before = meta_test(model, test, cfg, n_tasks=200)
    after = meta_test(trained, test, cfg, n_tasks=200)
    assert after["mean"] + after["ci95"] < before["mean"] - before["ci95"]
    assert before["metric"] == "mse" and after["n"] == 200
    assert not torch.equal(
        model.head.weight, trained.head.weight
    )  # the caller's model is untouched


def test_meta_test_reports_a_95_percent_interval():
    torch.manual_seed(0)
    model, cfg = MLP(1, 1, (8,)), MAMLConfig()
    r = meta_test(model, SinusoidTasks(5, 10), cfg, n_tasks=50, chunk=20)
    assert r["n"] == 50 and r["ci95"] > 0
    assert r == meta_test(model, SinusoidTasks(5, 10), cfg, n_tasks=50, chunk=20)


META = methods("meta")


@pytest.mark.parametrize("spec", META, ids=lambda s: s.key)
def test_meta_registry_contract(spec):
    cfg = spec.config()
    assert spec.config.build(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError):
        spec.config.build(cfg.to_dict(), not_a_field=1)
    a, b = spec.smoke(cfg, 0), spec.smoke(cfg, 0)
    assert (
        torch.equal(a["loss"], b["loss"])
        and torch.equal(a["head"], b["head"])
        and a["score"] == b["score"]
    )
    assert torch.isfinite(a["loss"]).all()


def test_every_method_of_the_issue_is_registered():
    names = {s.name for s in META}
    assert {"maml", "fomaml", "anil", "metasgd", "reptile", "protonets"} <= names


def test_cli_train_writes_a_run(tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.meta import app

    args = [
        "train",
        "--method",
        "fomaml",
        "--steps",
        "5",
        "--test-tasks",
        "20",
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["config"]["first_order"] is True
    assert manifest["metrics"]["test_metric"] == "mse" and manifest["metrics"]["test_n"] == 20
    assert (run / "model.pt").exists()
