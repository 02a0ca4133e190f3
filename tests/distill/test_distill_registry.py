"""What the registry knows of distillation: shapes, branches, access levels, commands, configs."""

from __future__ import annotations

import pytest
import torch

from lfm import registry
from lfm.access import Access, LocalClassifier, narrow
from lfm.core.tiny import tiny_cnn
from lfm.core.train import TrainConfig
from lfm.distill import DistillResult, InputSpec
from lfm.distill.adversarial import DFADConfig, DFMEConfig
from lfm.distill.contract import DISTILLER, LOSS
from lfm.distill.losses import KDConfig
from lfm.distill.recipes import LM_METHODS
from lfm.distill.vision import DATAFREE, vision_methods
from lfm.errors import ConfigError

SPECS = registry.methods("distill")
LOSSES = {"kd", "reverse_kl", "topk_kd", "dist", "fitnets", "at", "rkd", "pkt"}


def test_losses_and_distillers_have_their_shapes():
    losses = {s.name for s in SPECS if s.shape is LOSS}
    assert losses >= LOSSES  # more losses may register; each is a loss on outputs
    assert all(s.access in (Access.SCORES, Access.HIDDEN) for s in SPECS if s.shape is LOSS)
    assert {s.name for s in SPECS if s.shape is DISTILLER} == {
        "lm_student", "seq_kd", "step_by_step", "deep_inversion", "dafl", "dfad", "dfme",
        "topk_lm", "gkd", "uld",
    }  # fmt: skip
    assert {s.name for s in SPECS if s.access == Access.SCORES} >= {"kd", "topk_kd", "dist"}
    assert {s.name for s in SPECS if s.access == Access.HIDDEN} == {"fitnets", "at", "rkd", "pkt"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_config_round_trips_and_rejects_unknown_keys(spec):
    cfg = spec.config()
    assert spec.config.model_validate_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError):
        spec.config.build({"no_such_knob": 1})


def test_methods_sit_in_their_survey_branches_at_the_least_access():
    by_name = {s.name: s for s in SPECS}
    want = {
        "lm_student": ("with data", Access.WEIGHTS),
        "seq_kd": ("with data", Access.TEXT),
        "step_by_step": ("with data", Access.TEXT),
        "deep_inversion": ("noise optimisation", Access.WEIGHTS),
        "dafl": ("generative reconstruction", Access.WEIGHTS),
        "dfad": ("adversarial exploration", Access.WEIGHTS),
        "dfme": ("adversarial exploration", Access.SCORES),
        "topk_lm": ("with data", Access.SCORES),
        "gkd": ("with data", Access.SCORES),
        "uld": ("with data", Access.SCORES),
    }
    assert {k: (by_name[k].branch, by_name[k].access) for k in want} == want
    assert all("arXiv" in by_name[k].paper for k in want)


def test_every_method_names_a_command_that_takes_it_or_says_why_not():
    commands = {"vision": vision_methods(), "datafree": list(DATAFREE), "lm": list(LM_METHODS)}
    for spec in SPECS:
        if spec.cli.startswith("none: "):
            assert "\n" not in spec.cli and spec.name == "step_by_step"
            continue
        words = spec.cli.split()
        assert words[:2] == ["lfm", "distill"] and words[3:] == ["--method", spec.name], spec.cli
        assert spec.name in commands[words[2]], spec.cli


def _kd_call(cfg):
    teacher = narrow(LocalClassifier(tiny_cnn(0)), "scores")
    student = tiny_cnn(1, warm=False, width=4)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    train_cfg = TrainConfig(steps=2, lr=1e-2, progress=False)
    return registry.run("distill/kd", teacher, student, [x], cfg=cfg, train_cfg=train_cfg)


def test_a_subclassed_config_runs_the_method_chosen_by_name():
    class MyKD(KDConfig):  # a user's config: the method is still the one named
        pass

    mine, plain = _kd_call(MyKD(temperature=2.0)), _kd_call(KDConfig(temperature=2.0))
    assert isinstance(mine, DistillResult)
    assert mine.history.losses == plain.history.losses
    assert _kd_call({"temperature": 2.0}).history.losses == plain.history.losses
    with pytest.raises(ConfigError, match="distill/kd takes a KDConfig, not a DISTConfig"):
        from lfm.distill.losses import DISTConfig

        _kd_call(DISTConfig())


def test_dfad_and_dfme_do_not_take_each_others_config():
    teacher, student = LocalClassifier(tiny_cnn(0)), tiny_cnn(1, warm=False, width=4)
    with pytest.raises(ConfigError, match="distill/dfad takes a DFADConfig, not a DFMEConfig"):
        registry.run("distill/dfad", teacher, student, InputSpec((1, 8, 8)), cfg=DFMEConfig())
    with pytest.raises(ConfigError, match="distill/dfme takes a DFMEConfig, not a DFADConfig"):
        registry.run("distill/dfme", teacher, student, InputSpec((1, 8, 8)), cfg=DFADConfig())
