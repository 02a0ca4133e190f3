"""The method registry: each method is registered once, with its area, survey branch, access
level, config class and paper.

    @register("reuse", "ties", branch="weight interpolation", access=Access.WEIGHTS,
              config=TiesConfig, paper="Yadav et al. 2023, arXiv 2306.01708")
    def ties(...): ...

`lfm methods` lists the catalogue and one contract test runs over all of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lfm.access import Access, require
from lfm.config import Config
from lfm.errors import LfmError

AREAS: dict[str, tuple[str, ...]] = {
    "tuning": ("weight engineering", "input engineering", "database augmentation"),
    "distill": (
        "with data",
        "noise optimisation",
        "generative reconstruction",
        "adversarial exploration",
    ),
    "reuse": (
        "ensemble",
        "weight interpolation",
        "mode connectivity",
        "straightforward optimisation",
        "mixture of experts",
    ),
    "meta": ("meta-learning from data", "white-box data-free", "black-box data-free"),
    "edit": ("memory-based", "constrained tuning", "locate-and-edit", "meta-learned editor"),
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of one method."""

    area: str
    name: str
    branch: str
    access: Access
    config: type[Config]
    paper: str
    fn: Callable[..., Any]
    # `smoke(cfg, seed) -> result`: runs the method end to end on a tiny problem built in code.
    # The contract test calls it twice under one seed and compares the results.
    smoke: Callable[[Config, int], Any] | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"{self.area}/{self.name}"

    def check(self, *handles: Any) -> None:
        """Raise `AccessError` if any handle gives less access than this method needs."""
        for h in handles:
            require(h, self.access, f"{self.key}")


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    area: str,
    name: str,
    *,
    branch: str,
    access: Access,
    config: type[Config],
    paper: str,
    smoke: Callable[[Any, int], Any] | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as method `area/name`."""
    if area not in AREAS:
        raise LfmError(f"unknown area {area!r}; areas are {', '.join(AREAS)}")
    if branch not in AREAS[area]:
        raise LfmError(f"unknown branch {branch!r} for area {area}; choose from {AREAS[area]}")
    if not (isinstance(config, type) and issubclass(config, Config)):
        raise LfmError(f"{area}/{name}: config must be a subclass of lfm.config.Config")

    def deco(fn: F) -> F:
        spec = MethodSpec(area, name, branch, Access.parse(access), config, paper, fn, smoke)
        old = _REGISTRY.get(spec.key)
        if old is not None and old.fn.__qualname__ != fn.__qualname__:
            raise LfmError(f"method {spec.key} is registered twice")
        _REGISTRY[spec.key] = spec
        return fn

    return deco


def load_all() -> None:
    """Import every area package so that their methods register."""
    for area in AREAS:
        importlib.import_module(f"lfm.{area}")


def methods(area: str | None = None, access: Access | str | None = None) -> list[MethodSpec]:
    """Registered methods, optionally of one area and usable with a given access level."""
    load_all()
    if area is not None and area not in AREAS:
        raise LfmError(f"unknown area {area!r}; areas are {', '.join(AREAS)}")
    level = Access.parse(access) if access is not None else None
    specs = sorted(_REGISTRY.values(), key=lambda s: (list(AREAS).index(s.area), s.name))
    return [
        s
        for s in specs
        if (area is None or s.area == area) and (level is None or s.access <= level)
    ]


def get(key: str) -> MethodSpec:
    """A method by `area/name` (or by bare name when that is unambiguous)."""
    load_all()
    if key in _REGISTRY:
        return _REGISTRY[key]
    hits = [s for s in _REGISTRY.values() if s.name == key]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise LfmError(f"method name {key!r} is ambiguous: {', '.join(s.key for s in hits)}")
    raise LfmError(f"no method {key!r}; `lfm methods` lists them")
