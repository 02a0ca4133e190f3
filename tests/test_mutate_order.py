"""Under `make mutate`, a mutant's tests run fastest first (`pytest_collection_modifyitems` in
tests/conftest.py), by the durations mutmut measured; any other run keeps the selection's order."""

from __future__ import annotations

import json
from types import SimpleNamespace

from conftest import pytest_collection_modifyitems as order

IDS = ["tests/a.py::test_slow", "tests/a.py::test_unmeasured", "tests/b.py::test_fast"]
MUTANT = "lfm.edit.rome.x_f__mutmut_1"


def _ordered(monkeypatch, cwd, mutant: str) -> list[str]:
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MUTANT_UNDER_TEST", mutant)
    items = [SimpleNamespace(nodeid=i) for i in IDS]
    order(None, items)
    return [item.nodeid for item in items]


def test_a_mutants_tests_run_fastest_first_and_unmeasured_ones_last(tmp_path, monkeypatch):
    durations = {IDS[0]: 3.0, IDS[2]: 0.5, "tests/c.py::test_slowest": 9.0}
    stats = {"duration_by_test": durations, "tests_by_mangled_function_name": {}}
    (tmp_path / "mutmut-stats.json").write_text(json.dumps(stats))
    assert _ordered(monkeypatch, tmp_path, MUTANT) == [IDS[2], IDS[0], IDS[1]]
    # mutmut's own runs (its clean run, the forced failure, the stats) keep the order
    for own in ("", "fail", "stats"):
        assert _ordered(monkeypatch, tmp_path, own) == IDS


def test_without_mutmuts_measures_the_order_is_kept(tmp_path, monkeypatch):
    assert _ordered(monkeypatch, tmp_path, MUTANT) == IDS
