"""Method configurations: frozen, typed, validated at the edge.

Every method's config subclasses `Config`: a frozen pydantic model that rejects unknown keys,
coerces numbers by field type (YAML reads `3e-4` as a string), and round-trips to JSON/YAML so
the resolved config can be saved beside every output. Fields carry the ranges their method needs
(counts at least 1, rates above 0, shares in [0, 1]; a scale that may be negative has none) and no
float field takes nan or ±inf, so a config that validates is one its method can run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lfm.errors import ConfigError


class Config(BaseModel):
    """Base class for method configs; give each field a paper default and a comment."""

    # nan and ±inf are refused in every float field: no method means them, and one would run and
    # give a silently wrong (non-finite) result; a field that needs inf allows it on itself
    # (`Field(allow_inf_nan=True)`).
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )

    @classmethod
    def build(cls, data: dict[str, Any] | None = None, /, **overrides: Any) -> Self:
        """Validate `data` updated by `overrides`; a one-line `ConfigError` when rejected."""
        merged = {**(data or {}), **overrides}
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"{cls.__name__}: {problems}") from None

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a YAML or JSON file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping, not {type(data).__name__}")
        return cls.build(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> Self:
        """A validated copy with some fields changed."""
        return type(self).build(self.to_dict(), **changes)
