"""The registry, and the contract every registered method keeps.

The contract test runs *every* registered method through `lfm.registry.run`:
- once at its declared level, through handles of exactly that level (narrowed handles, not
  white-box models, for every level below WEIGHTS), twice under one seed with equal results;
- once with handles one level below, where the call must fail with an `AccessError` naming both
  levels before the method runs — also when the registered function is called directly.
So a method that declares SCORES but reads weights fails here, and so does one that forgets the
gate.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from lfm import registry
from lfm.access import Access, LocalClassifier, LocalModel, access_of, levels, narrow
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


def _white_box(h) -> bool:
    return isinstance(h, LocalModel | LocalClassifier | nn.Module | dict)


def _call(spec, ex):
    return registry.run(spec.key, *ex.args, cfg=ex.cfg, **ex.kwargs)


@pytest.mark.parametrize("spec", SPECS, ids=[s.key for s in SPECS])
def test_contract(spec):
    # paper defaults validate; the config round-trips through JSON; unknown keys are refused
    cfg = spec.config()
    assert isinstance(cfg, Config)
    assert spec.config.model_validate_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="not_a_knob"):
        spec.config.build(not_a_knob=1)
    # it declares where it sits in the survey and how to reach it
    assert spec.branch in registry.AREAS[spec.area] and spec.paper and spec.cli
    assert spec.example is not None, f"{spec.key} has no example"

    # at its level, through handles of exactly that level
    ex = spec.example(spec.access, 0)
    handles = spec.handles_of(*ex.args, cfg=ex.cfg, **ex.kwargs)
    assert handles, f"{spec.key}: the example's call carries no handle"
    assert all(access_of(h) == spec.access for h in handles)
    if spec.access < Access.WEIGHTS:
        assert not any(_white_box(h) for h in handles), "a white-box handle below WEIGHTS"
    first = ex.summary(_call(spec, ex))
    again = spec.example(spec.access, 0)
    assert first is not None and _same(first, again.summary(_call(spec, again)))

    # one level below: refused before the method runs, through `run` and a direct call
    below = [lv for lv in levels(handles[0]) if lv < spec.access]
    if spec.access > Access.TEXT:
        assert below, f"{spec.key}: its example's handles cannot be narrowed below its level"
        low = spec.example(max(below), 0)
        want = f"{spec.key} needs {spec.access.name} access.*only {max(below).name}"
        with pytest.raises(AccessError, match=want):
            _call(spec, low)
        if spec.shape.call is None:
            with pytest.raises(AccessError, match=want):
                spec.fn(*low.args, cfg=low.cfg, **low.kwargs)


@pytest.mark.parametrize("spec", SPECS, ids=[s.key for s in SPECS])
def test_registered_function_has_its_area_shape(spec):
    params = list(inspect.signature(spec.impl).parameters)
    assert params[: len(spec.shape.params)] == spec.shape.params
    assert spec.shape.area == spec.area


def test_names_are_one_spelling():
    for s in SPECS:
        assert s.name == s.name.lower() and "-" not in s.name, s.key
        assert s.config.__name__.endswith("Config"), s.config.__name__
    assert registry.get("ft-l") is registry.get("edit/ft_l")  # hyphens read as underscores


def test_register_validates_its_arguments():
    class C(Config):
        pass

    from lfm.edit.contract import EDITOR

    with pytest.raises(LfmError, match="unknown area 'cooking'"):
        registry.register(
            "cooking", "x", shape=EDITOR, branch="b", access=Access.TEXT, config=C, paper="p"
        )
    with pytest.raises(LfmError, match="unknown branch 'magic' for area edit"):
        registry.register(
            "edit", "x", shape=EDITOR, branch="magic", access=Access.TEXT, config=C, paper="p"
        )
    with pytest.raises(LfmError, match=r"subclass of lfm\.config\.Config"):
        registry.register(
            "edit", "x", shape=EDITOR, branch="memory-based", access="text", config=dict, paper="p"
        )  # type: ignore[arg-type]
    with pytest.raises(LfmError, match="belongs to area edit"):
        registry.register(
            "reuse", "x", shape=EDITOR, branch="ensemble", access="text", config=C, paper="p"
        )
    with pytest.raises(LfmError, match="lower case with underscores"):
        registry.register(
            "edit", "x-y", shape=EDITOR, branch="memory-based", access="text", config=C, paper="p"
        )

    def not_an_editor(model, facts, cfg=None):
        return None

    deco = registry.register(
        "edit", "_bad", shape=EDITOR, branch="memory-based", access="text", config=C, paper="p"
    )
    with pytest.raises(LfmError, match=r"does not have the edit editor shape.*\(model, facts"):
        deco(not_an_editor)


class _Handle:
    def __init__(self, level):
        self.access = Access.parse(level)


def test_the_gate_resolves_configs_and_checks_access_once_for_every_method():
    from lfm.edit.contract import EDITOR

    class C(Config):
        x: int = 1

    class Other(Config):
        pass

    seen = []
    deco = registry.register(
        "edit", "_gate", shape=EDITOR, branch="memory-based", access="scores", config=C, paper="p",
        cli="none: a test entry",
    )  # fmt: skip

    def editor(handle, requests, cfg=None):
        seen.append(cfg)
        return cfg.x

    gated = deco(editor)
    try:
        assert gated(_Handle("scores"), []) == 1 and isinstance(seen[-1], C)
        assert registry.run("edit", "_gate", _Handle("weights"), [], cfg={"x": 3}) == 3
        assert registry.run("edit/_gate", _Handle("scores"), [], cfg=C(x=4)) == 4

        class Sub(C):  # a user's subclass of the config is still this method's config
            pass

        assert gated(_Handle("scores"), [], Sub(x=5)) == 5
        with pytest.raises(ConfigError, match="takes a C, not a Other"):
            gated(_Handle("scores"), [], Other())
        with pytest.raises(ConfigError, match="x: Input should be a valid integer"):
            gated(_Handle("scores"), [], {"x": "many"})
        n = len(seen)
        with pytest.raises(AccessError, match=r"edit/_gate needs SCORES access.*only TEXT"):
            gated(_Handle("text"), [])
        assert len(seen) == n  # refused before the method ran
        with pytest.raises(LfmError, match="edit/_gate: missing a required argument"):
            registry.run("edit/_gate", _Handle("scores"))
    finally:
        registry._REGISTRY.pop("edit/_gate")


def test_duplicate_names_are_refused_and_lookup_works():
    from lfm.edit.contract import EDITOR

    class C(Config):
        pass

    deco = registry.register(
        "edit", "_test_dup", shape=EDITOR, branch="memory-based", access="scores", config=C,
        paper="p",
    )  # fmt: skip

    def first(handle, requests, cfg=None):
        return 1

    def second(handle, requests, cfg=None):
        return 2

    deco(first)
    try:
        assert registry.get("edit/_test_dup").impl is first
        assert registry.get("_test_dup").access is Access.SCORES
        with pytest.raises(LfmError, match="registered twice"):
            deco(second)
    finally:
        registry._REGISTRY.pop("edit/_test_dup")
    with pytest.raises(LfmError, match="no method 'nothing'"):
        registry.get("nothing")
    with pytest.raises(LfmError, match="did you mean 'rome'"):
        registry.get("edit/rom")


def test_filters():
    scores_ok = registry.methods(access="scores")
    assert all(s.access <= Access.SCORES for s in scores_ok)
    for area in registry.AREAS:
        assert all(s.area == area for s in registry.methods(area=area))
    with pytest.raises(LfmError, match="unknown area"):
        registry.methods(area="nope")


def test_handles_narrow_to_every_level_the_contract_needs():
    from lfm.core.tiny import tiny_lm, tiny_mlp

    lm = LocalModel(*tiny_lm())
    clf = LocalClassifier(tiny_mlp())
    assert levels(lm) == list(Access)
    assert levels(clf) == [Access.TEXT, Access.SCORES, Access.HIDDEN, Access.WEIGHTS]
    assert levels(narrow(clf, "hidden")) == [Access.TEXT, Access.SCORES, Access.HIDDEN]
    assert levels(nn.Linear(2, 2)) == [Access.WEIGHTS]


def test_every_cli_string_names_a_command_that_exists_or_says_why_not():
    """`spec.cli` is `lfm <group> <command> ...` (a real command) or one line of reason."""
    import typer.main

    from lfm.cli import app

    root = typer.main.get_command(app)
    for s in SPECS:
        if not s.cli.startswith("lfm "):
            assert len(s.cli.split()) >= 4 and "\n" not in s.cli, s.key  # a reason, one line
            continue
        words, cmd = s.cli.split()[1:], root
        while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
            cmd = cmd.commands[words.pop(0)]
        assert not hasattr(cmd, "commands"), f"{s.key}: {s.cli!r} names no command"
        options = {o for p in cmd.params for o in getattr(p, "opts", [])}
        for word in words:
            if word.startswith("-"):
                assert word in options, f"{s.key}: {s.cli!r}: no option {word}"
