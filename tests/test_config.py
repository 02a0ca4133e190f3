"""Configs: frozen, typed, unknown keys rejected, numbers coerced, round-trips."""

from __future__ import annotations

import pydantic
import pytest
from pydantic import Field

from lfm.config import Config
from lfm.errors import ConfigError


class Demo(Config):
    lr: float = 1e-3  # learning rate
    steps: int = Field(10, ge=1)  # optimiser steps
    name: str = "x"


def test_yaml_strings_are_coerced_by_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nsteps: '20'\n")  # PyYAML reads 3e-4 as a string
    cfg = Demo.load(path)
    assert cfg.lr == pytest.approx(3e-4) and cfg.steps == 20


def test_unknown_keys_and_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="Demo: lrr: Extra inputs are not permitted"):
        Demo.build(lrr=1.0)
    with pytest.raises(ConfigError, match="steps: Input should be greater than or equal to 1"):
        Demo.build(steps=0)
    with pytest.raises(ConfigError) as e:
        Demo.build(steps="many", lr="fast")
    assert "\n" not in str(e.value)


def test_frozen_round_trip_and_replace():
    cfg = Demo.build(lr=0.1)
    with pytest.raises(pydantic.ValidationError):
        cfg.lr = 0.2  # type: ignore[misc]
    assert Demo.model_validate_json(cfg.to_json()) == cfg
    assert cfg.replace(steps=5) == Demo(lr=0.1, steps=5)


def test_load_rejects_non_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        Demo.load(path)
