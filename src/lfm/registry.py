"""The method registry, and the one call path through which every method runs.

Each area names the callable shapes of its methods (`Shape`: a `typing.Protocol` and how `run`
calls it), and every method is registered once with its area, shape, survey branch, access level,
config class and paper:

    def rome(handle, requests, cfg=None): ...

    rome = register("edit", "rome", shape=EDITOR, branch="locate-and-edit",
                    access=Access.WEIGHTS, config=RomeConfig,
                    paper="Meng et al. 2022, arXiv 2202.05262", example=_example)(rome)

(`@register(...)` as a decorator does the same; the method files use the call, since mutmut
skips decorated functions.) The name `register` returns is the function a user calls. Calling
it, or `run("edit", "rome", handle, requests, cfg=...)`, goes through one gate: the config is
resolved (None: paper defaults; a mapping: validated; another method's config: refused) and every
handle the call carries is checked against the method's access level before the method runs — an
`AccessError` naming both levels. A config is data: the method is chosen by its name, never by its config's class.

`lfm methods` lists the catalogue; one contract test runs every entry through its `example`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lfm.access import Access, require
from lfm.config import Config
from lfm.errors import ConfigError, LfmError, did_you_mean

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
Handles = Callable[[Mapping[str, Any]], Iterable[Any]]


@dataclass(frozen=True)
class Shape:
    """One callable shape of an area.

    Args:
        area: the area it belongs to.
        name: `kernel`, `ensemble`, `editor`, `loss`, `distiller`, `learner`, `tuner` ...
        protocol: a `typing.Protocol` whose `__call__` the registered functions match: the same
            leading parameters, by name and order (more parameters must have defaults).
        handles: the handles in a call, from its arguments bound by name: a parameter name (its
            value is a handle or a sequence of handles) or a function of the bound arguments.
        call: how `run` calls a method of this shape, `call(spec, *args, cfg=cfg, **kw)`, when the
            registered function is not itself called with handles (a per-tensor kernel is mapped
            over models by the merge driver; a loss is trained through the distiller). Its
            signature, less `spec`, is the signature `run` takes.
    """

    area: str
    name: str
    protocol: type
    handles: str | Handles
    call: Callable[..., Any] | None = None

    @property
    def params(self) -> list[str]:
        """The protocol's parameters, in order."""
        sig = inspect.signature(self.protocol.__call__)
        return [p for p in sig.parameters if p != "self"]

    def signature(self) -> inspect.Signature:
        """The signature of a call through `run` (the `call`'s, else the protocol's)."""
        fn = self.call if self.call is not None else self.protocol.__call__
        params = list(inspect.signature(fn).parameters.values())[1:]  # less `spec` / `self`
        return inspect.Signature(params)

    def handles_in(self, arguments: Mapping[str, Any]) -> list[Any]:
        """Every handle among a call's bound arguments."""
        if callable(self.handles):
            return [h for h in self.handles(arguments) if h is not None]
        value = arguments.get(self.handles)
        if value is None:
            return []
        if isinstance(value, list | tuple):
            return [h for h in value if h is not None]
        return [value]


def shape(area: str, name: str, protocol: type, handles: str | Handles, call: Any = None) -> Shape:
    """Declare a callable shape of `area` (see `Shape`)."""
    if area not in AREAS:
        raise LfmError(f"unknown area {area!r}; areas are {', '.join(AREAS)}")
    return Shape(area, name, protocol, handles, call)


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of one method."""

    area: str
    name: str
    shape: Shape
    branch: str
    access: Access
    config: type[Config]
    paper: str
    fn: Callable[..., Any]  # the checked function: what users call
    impl: Callable[..., Any] = field(compare=False)  # the bare function behind it
    # `example(level, seed) -> Example`: a tiny problem built in code, with its handles given at
    # `level`. The contract test runs it at the method's level and refuses it one level below.
    example: Callable[[Access, int], Any] | None = field(default=None, compare=False)
    cli: str = ""  # the command that runs it (`lfm edit apply -m rome`), or why there is none
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False)  # shape-specific facts

    @property
    def key(self) -> str:
        return f"{self.area}/{self.name}"

    def resolve(self, cfg: Config | Mapping[str, Any] | None) -> Config:
        """A validated config of this method: defaults for None, built from a mapping."""
        if cfg is None:
            return self.config()
        if isinstance(cfg, self.config):
            return cfg
        if isinstance(cfg, Config):
            raise ConfigError(
                f"{self.key} takes a {self.config.__name__}, not a {type(cfg).__name__}"
            )
        if isinstance(cfg, Mapping):
            return self.config.build(dict(cfg))
        raise ConfigError(f"{self.key}: a config is a {self.config.__name__} or a mapping")

    def bind(self, *args: Any, **kwargs: Any) -> inspect.BoundArguments:
        """A call's arguments bound by name, as `run` would pass them (`cfg` included)."""
        sig = self.shape.signature() if self.shape.call else inspect.signature(self.impl)
        try:
            return sig.bind(*args, **kwargs)
        except TypeError as e:
            raise LfmError(f"{self.key}: {e}") from None

    def handles_of(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The handles a call through `run` with these arguments carries."""
        return self.shape.handles_in(self.bind(*args, **kwargs).arguments)

    def check(self, *handles: Any) -> None:
        """Raise `AccessError` if any handle gives less access than this method needs."""
        for h in handles:
            require(h, self.access, self.key)


@dataclass(frozen=True)
class Example:
    """A registered method's tiny problem: the arguments of a call through `run`.

    Args:
        args, kwargs: the call's arguments (handles already at the level asked for).
        cfg: the config to run with (small budgets); None for the paper defaults.
        summary: maps the result to tensors or numbers, compared between two runs of one seed.
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    cfg: Config | None = None
    summary: Callable[[Any], Any] = lambda result: result


_REGISTRY: dict[str, MethodSpec] = {}


def _check_shape(fn: Callable[..., Any], shp: Shape, key: str) -> None:
    """The function's leading parameters are the protocol's; any more have defaults."""
    params = list(inspect.signature(fn).parameters.values())
    want = shp.params
    got = [p.name for p in params[: len(want)]]
    if got != want:
        raise LfmError(
            f"{key} does not have the {shp.area} {shp.name} shape: its parameters begin "
            f"({', '.join(got)}), not ({', '.join(want)})"
        )
    rest = [p.name for p in params[len(want) :] if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    if rest:
        raise LfmError(f"{key}: parameters after the {shp.name} shape need defaults: {rest}")


def _gate(spec_key: str, impl: Callable[..., Any], shp: Shape) -> Callable[..., Any]:
    """`impl` behind the one gate: config resolved, every handle's access checked first."""
    sig = inspect.signature(impl)

    @functools.wraps(impl)
    def gated(*args: Any, **kwargs: Any) -> Any:
        spec = _REGISTRY[spec_key]
        bound = spec.bind(*args, **kwargs)
        if "cfg" in sig.parameters:
            bound.arguments["cfg"] = spec.resolve(bound.arguments.get("cfg"))
        spec.check(*shp.handles_in(bound.arguments))
        return impl(*bound.args, **bound.kwargs)

    return gated


def register(
    area: str,
    name: str,
    *,
    shape: Shape,
    branch: str,
    access: Access | str,
    config: type[Config],
    paper: str,
    example: Callable[[Access, int], Any] | None = None,
    cli: str = "",
    **extras: Any,
) -> Callable[[F], F]:
    """Register the decorated function as method `area/name`; returns it behind the gate.

    A variant that differs only in defaults is another `register` call over the same function.
    """
    if area not in AREAS:
        raise LfmError(f"unknown area {area!r}; areas are {', '.join(AREAS)}")
    if branch not in AREAS[area]:
        raise LfmError(f"unknown branch {branch!r} for area {area}; choose from {AREAS[area]}")
    if not (isinstance(config, type) and issubclass(config, Config)):
        raise LfmError(f"{area}/{name}: config must be a subclass of lfm.config.Config")
    if shape.area != area:
        raise LfmError(f"{area}/{name}: the {shape.name} shape belongs to area {shape.area}")
    if name != name.lower() or "-" in name or " " in name:
        raise LfmError(f"{area}/{name}: method names are lower case with underscores")
    key = f"{area}/{name}"

    def deco(fn: F) -> F:
        _check_shape(fn, shape, key)
        old = _REGISTRY.get(key)
        if old is not None and old.impl.__qualname__ != fn.__qualname__:
            raise LfmError(f"method {key} is registered twice")
        gated = _gate(key, fn, shape) if shape.call is None else fn
        _REGISTRY[key] = MethodSpec(
            area, name, shape, branch, Access.parse(access), config, paper, gated, fn,
            example, cli, dict(extras),
        )  # fmt: skip
        return gated  # type: ignore[return-value]

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


def _normal(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get(key: str, area: str | None = None) -> MethodSpec:
    """A method by `area/name`, by `name` within `area`, or by a bare name when unambiguous.

    Hyphens are read as underscores (`ft-l` finds `edit/ft_l`).
    """
    key = _normal(key)
    if area is not None:
        key = f"{area}/{key.removeprefix(area + '/')}"
    prefix = key.split("/", 1)[0] if "/" in key else None
    if prefix in AREAS:
        importlib.import_module(f"lfm.{prefix}")  # only that area: a merge need not load PEFT
    else:
        load_all()
    if key in _REGISTRY:
        return _REGISTRY[key]
    hits = [s for s in _REGISTRY.values() if s.name == key]
    if len(hits) == 1 and area is None:
        return hits[0]
    if len(hits) > 1:
        raise LfmError(f"method name {key!r} is ambiguous: {', '.join(s.key for s in hits)}")
    area = area or prefix
    names = sorted(s.name for s in _REGISTRY.values() if area is None or s.area == area)
    hint = did_you_mean(key.rsplit("/", 1)[-1], names) or "; `lfm methods` lists them"
    raise LfmError(f"no method {key!r}{hint}")


def run(
    method: str, /, *args: Any, cfg: Config | Mapping[str, Any] | None = None, **kw: Any
) -> Any:
    """Run a registered method by name through its area's shape.

        run("edit", "rome", handle, requests, cfg={"layer": 5})
        run("reuse/ties", [model_a, model_b], base=base)   # a kernel, mapped over the models

    `method` is `area/name`, or an area followed by the name as the next argument. Every handle
    the call carries is checked against the method's access level first, and the config is
    resolved (None: paper defaults; a mapping: validated).
    """
    if method in AREAS and args and isinstance(args[0], str):
        spec = get(args[0], area=method)
        args = args[1:]
    else:
        spec = get(method)
    if spec.shape.call is None:
        return spec.fn(*args, cfg=cfg, **kw)
    bound = spec.bind(*args, cfg=cfg, **kw)
    config = spec.resolve(cfg)
    spec.check(*spec.shape.handles_in(bound.arguments))
    bound.arguments["cfg"] = config
    return spec.shape.call(spec, *bound.args, **bound.kwargs)
