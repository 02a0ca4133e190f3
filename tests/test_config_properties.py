"""Properties of every method's config, and of runs under any config that validates.

1. Any mapping — each field given a random value (ints, floats with nan, ±inf and negatives,
   strings, None, lists), keys dropped, misspelt or added — builds either a valid config or a
   one-line `ConfigError`; never another exception. A valid one holds only finite floats and
   round-trips through JSON.
2. A handful of methods run their registry example under a drawn *valid* config (budgets capped
   small): the result is finite, or the run stops with a one-line `LfmError`.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lfm import registry
from lfm.config import Config
from lfm.core.train import TrainConfig
from lfm.errors import ConfigError, LfmError

CLASSES = sorted({s.config for s in registry.methods()} | {TrainConfig}, key=lambda c: c.__name__)

# Values a user could write into a YAML file or a --config, right or wrong.
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 0.0, -0.0, 1e-300, "nan", "inf", "-inf", "1e-3", "each", ""]),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.floats(), max_size=2),
)


@st.composite
def mappings(draw: st.DrawFn, cls: type[Config]) -> dict[str, Any]:
    """A config mapping: some fields set at random, some dropped, some misspelt, some invented."""
    data: dict[str, Any] = {}
    for name in cls.model_fields:
        action = draw(st.sampled_from(["drop", "drop", "value", "misspell"]))
        if action == "value":
            data[name] = draw(VALUES)
        elif action == "misspell":
            data[name + draw(st.sampled_from(["_", "s", "X"]))] = draw(VALUES)
    for key in draw(st.lists(st.text(min_size=1, max_size=8), max_size=2)):
        data[key] = draw(VALUES)
    return data


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, list | tuple):
        return [f for v in value for f in _floats(v)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    return []


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mapping_builds_a_valid_config_or_a_one_line_config_error(cls, data):
    mapping = data.draw(mappings(cls))
    try:
        cfg = cls.build(mapping)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(cls.__name__)
        return
    assert all(math.isfinite(f) for f in _floats(cfg.model_dump()))
    assert cls.model_validate_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_nan_and_inf_are_refused_in_every_float_field(cls):
    floats = [n for n, f in cls.model_fields.items() if _takes_float(f.annotation)]
    for name in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=name):
                cls.build({name: bad})


def _takes_float(annotation: Any) -> bool:
    """A field typed float (alone, optional, or in a tuple): one that could hold nan."""
    return annotation is float or "float" in str(annotation)


# ---- runs under valid configs ----

LR = st.floats(1e-4, 0.5)
LAYER = st.integers(-3, 2)  # the examples' models have 2 blocks: −3 and 2 are out of range
RUNS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "distill/kd": {"temperature": st.floats(0.05, 50)},
    "distill/skew_kl": {"alpha": st.floats(0, 0.99), "temperature": st.floats(0.05, 50)},
    "edit/ft_l": {
        "layer": LAYER, "steps": st.integers(1, 3), "lr": LR,
        "norm_constraint": st.floats(1e-5, 1), "stop_nll": st.floats(0, 5),
    },
    "edit/rome": {
        "layer": LAYER, "v_steps": st.integers(1, 3), "n_prefixes": st.integers(1, 11),
        "v_lr": LR, "kl_factor": st.floats(0, 1), "clamp_norm": st.floats(0.01, 10),
        "key_constraint": st.sampled_from(["each", "mean"]), "use_cov": st.booleans(),
    },
    "edit/memit": {
        "layers": st.lists(LAYER, min_size=1, max_size=3).map(tuple), "v_steps": st.integers(1, 3),
        "n_prefixes": st.integers(1, 4), "clamp_norm": st.floats(0.01, 4),
        "mom2_update_weight": st.floats(1e-3, 1e5), "null_space": st.booleans(),
    },
    "meta/maml": {
        "steps": st.integers(0, 3), "inner_steps": st.integers(0, 2), "meta_batch": st.integers(1, 3),
        "inner_lr": LR, "outer_lr": LR, "first_order": st.booleans(),
    },
    "tuning/mezo": {"lr": st.floats(1e-5, 1e-2), "eps": st.floats(1e-4, 1e-1),
                    "steps": st.integers(1, 4)},
    "distill/lm_student": {
        "every": st.integers(1, 3), "offset": LAYER, "temperature": st.floats(0.1, 10),
        "kd_weight": st.floats(0, 10), "lm_weight": st.floats(0, 10),
    },
}  # fmt: skip
SPECS = {s.key: s for s in registry.methods()}


def _all_finite(result: Any) -> bool:
    if isinstance(result, torch.Tensor):
        return bool(torch.isfinite(result.float()).all())
    if isinstance(result, dict):
        return all(_all_finite(v) for v in result.values())
    if isinstance(result, list | tuple):
        return all(_all_finite(v) for v in result)
    if isinstance(result, float | int):
        return math.isfinite(result)
    return True


@pytest.mark.parametrize("key", list(RUNS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_valid_config_runs_to_a_finite_result_or_a_one_line_error(key, data):
    spec = SPECS[key]
    drawn = data.draw(st.fixed_dictionaries({}, optional=RUNS[key]))
    ex = spec.example(spec.access, 0)
    base = (ex.cfg or spec.config()).to_dict()
    cfg = spec.config.build(base, **drawn)  # every drawn value is in range: this must validate
    try:
        result = registry.run(spec.key, *ex.args, cfg=cfg, **ex.kwargs)
    except LfmError as e:
        assert "\n" not in str(e)
        return
    summary = ex.summary(result)
    assert _all_finite(summary), f"{key} under {drawn} gave a non-finite result"
