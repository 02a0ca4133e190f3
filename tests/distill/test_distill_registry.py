"""The contract every registered distillation loss keeps."""

from __future__ import annotations

import pytest
import torch

from lfm.access import Access
from lfm.errors import ConfigError
from lfm.registry import methods

SPECS = methods("distill")


def test_all_losses_registered():
    names = {s.name for s in SPECS}
    assert {"kd", "reverse_kl", "topk_kd", "dist", "fitnets", "at", "rkd", "pkt"} <= names
    assert {s.name for s in SPECS if s.access == Access.SCORES} >= {"kd", "topk_kd", "dist"}
    assert {s.name for s in SPECS if s.access == Access.HIDDEN} >= {"fitnets", "at", "rkd", "pkt"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_smoke_is_deterministic_and_finite(spec):
    cfg = spec.config()
    a, b = spec.smoke(cfg, 0), spec.smoke(cfg, 0)
    assert isinstance(a, torch.Tensor) and a.isfinite().all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, spec.smoke(cfg, 1))


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
    }
    assert {k: (by_name[k].branch, by_name[k].access) for k in want} == want
    assert all("arXiv" in by_name[k].paper for k in want)
