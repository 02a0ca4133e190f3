"""The catalogue file behind `lfm --help`, `methods`, `models` and `datasets`: equal to the live
registry, and read without importing torch, transformers or any method module."""

from __future__ import annotations

import pytest

from lfm.cli import catalogue

from conftest import cli_run

HEAVY = ("torch", "transformers", "peft", "numpy", "lfm.cli.", "lfm.serve", "lfm.tuning",
         "lfm.distill", "lfm.reuse", "lfm.meta", "lfm.edit")  # fmt: skip


def _run(argv: list[str]) -> tuple[str, list[str]]:
    """(what the command printed, the heavy or lfm command modules it imported)."""
    return cli_run(argv, HEAVY)


def test_the_catalogue_file_equals_the_live_registry():
    # a method registered (or a model, data set or group added) without rewriting the file fails
    # here: `python tools/make_catalogue.py` rewrites it
    assert catalogue.read() == catalogue.build()


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["models"], ["datasets"]])
def test_catalogue_commands_import_no_torch_and_no_method(argv):
    printed, modules = _run(argv)
    assert modules == ["lfm.cli.catalogue", "lfm.cli.common"]
    if argv == ["--help"]:  # every group and top-level command is listed, by its help
        cat = catalogue.read()
        for name in (*cat["groups"], *cat["commands"]):
            assert f" {name} " in printed
    if argv == ["methods"]:
        assert f"methods ({len(catalogue.read()['methods'])})" in printed


def test_a_mistyped_group_is_suggested_without_importing_it():
    printed, modules = _run(["tunning"])
    assert "Did you mean 'tuning'" in printed
    assert "torch" not in modules


def test_a_named_group_is_mounted_for_real():
    printed, modules = _run(["meta", "--help"])
    assert "lfm.cli.meta" in modules and "lfm.cli.edit" not in modules
    assert "train" in printed  # its commands, not the stand-in's empty group


def test_methods_filters_as_the_registry_does():
    from lfm.registry import methods

    for area, access in [(None, "scores"), ("edit", None), ("reuse", "weights"), (None, "text")]:
        live = [(s.area, s.name) for s in methods(area=area, access=access)]
        read = [(m["area"], m["name"]) for m in catalogue.methods(area=area, access=access)]
        assert read == live
