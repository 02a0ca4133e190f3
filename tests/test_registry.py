"""The registry, and the contract every registered method keeps."""

from __future__ import annotations

import pytest
import torch

from lfm import registry
from lfm.access import Access, LocalClassifier, narrow
from lfm.config import Config
from lfm.errors import AccessError, ConfigError, LfmError

SPECS = registry.methods()


def test_every_area_is_populated_or_known():
    assert {s.area for s in SPECS} <= set(registry.AREAS)
    assert len({s.key for s in SPECS}) == len(SPECS)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("spec", SPECS, ids=[s.key for s in SPECS])
def test_contract(spec):
    # paper defaults validate; the config round-trips through JSON; unknown keys are refused
    cfg = spec.config()
    assert isinstance(cfg, Config)
    assert spec.config.model_validate_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="not_a_knob"):
        spec.config.build(not_a_knob=1)
    # it declares where it sits in the survey
    assert spec.branch in registry.AREAS[spec.area] and spec.paper
    # it runs end to end, deterministically under a seed
    assert spec.smoke is not None, f"{spec.key} has no smoke run"
    first, second = spec.smoke(cfg, 0), spec.smoke(cfg, 0)
    assert first is not None and _same(first, second)
    # it refuses a handle below its access level, naming both levels
    if spec.access > Access.TEXT:
        below = narrow(LocalClassifier(torch.nn.Linear(2, 2)), Access.TEXT)
        with pytest.raises(AccessError, match=f"needs {spec.access.name} access.*only TEXT"):
            spec.check(below)


def test_register_validates_its_arguments():
    class C(Config):
        pass

    with pytest.raises(LfmError, match="unknown area 'cooking'"):
        registry.register("cooking", "x", branch="b", access=Access.TEXT, config=C, paper="p")
    with pytest.raises(LfmError, match="unknown branch 'magic' for area reuse"):
        registry.register("reuse", "x", branch="magic", access=Access.TEXT, config=C, paper="p")
    with pytest.raises(LfmError, match=r"subclass of lfm\.config\.Config"):
        registry.register(
            "reuse", "x", branch="ensemble", access=Access.TEXT, config=dict, paper="p"
        )  # type: ignore[arg-type]


def test_duplicate_names_are_refused_and_lookup_works():
    class C(Config):
        pass

    deco = registry.register(
        "reuse", "_test_dup", branch="ensemble", access="scores", config=C, paper="p"
    )

    def first():
        return 1

    def second():
        return 2

    deco(first)
    try:
        assert registry.get("reuse/_test_dup").fn is first
        assert registry.get("_test_dup").access is Access.SCORES
        with pytest.raises(LfmError, match="registered twice"):
            deco(second)
    finally:
        registry._REGISTRY.pop("reuse/_test_dup")
    with pytest.raises(LfmError, match="no method 'nothing'"):
        registry.get("nothing")


def test_filters():
    scores_ok = registry.methods(access="scores")
    assert all(s.access <= Access.SCORES for s in scores_ok)
    for area in registry.AREAS:
        assert all(s.area == area for s in registry.methods(area=area))
    with pytest.raises(LfmError, match="unknown area"):
        registry.methods(area="nope")
