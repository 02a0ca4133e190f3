"""Property: any merge plan, however wrong, gives a merged model whose weights are all finite or a
one-line `LfmError`; never another exception, never a non-finite output.

Plans are drawn in lfm's format and mergekit's, over the registry's merge kernels (those that need
no statistics file), with weights that may be NaN, infinite, zero, negative or not numbers,
parameters in and out of range, and keys misspelt at any level. The models are tiny MLPs saved as
safetensors (`lfm.core.tiny`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lfm.core.tiny import tiny_mlp
from lfm.errors import LfmError
from lfm.registry import methods
from lfm.reuse.driver import kernel_spec
from lfm.reuse.plan import MERGEKIT_METHOD_PARAMETERS, MERGEKIT_METHODS
from lfm.reuse.recipes import merge_plan

MAX_EXAMPLES = 100
NEEDS_FILES = {"fisher", "regmean", "adamerging"}  # statistics or coefficients files
KERNELS = sorted(
    s.name for s in methods("reuse") if s.shape.name == "kernel" and s.name not in NEEDS_FILES
)
MODELS = ("a.safetensors", "b.safetensors", "c.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("base.safetensors", *MODELS)):
        sd = {k: v.contiguous() for k, v in tiny_mlp(seed).state_dict().items()}
        save_file(sd, str(root / name))
    return root


# Valid draws are the likelier ones, so that many plans reach the kernels and the output check.
weights = st.one_of(
    st.floats(0.1, 3),
    st.sampled_from([1.0, 0.5, 0.0, -1.0, math.nan, math.inf, -math.inf, 1e38]),
    st.floats(-3, 3),
    st.sampled_from(["0.5", "abc", True, None, [1]]),
)
values = st.one_of(
    st.floats(0, 1),
    st.floats(-0.5, 1.5),
    st.sampled_from([0.0, 1.0, math.nan, math.inf, "x", True, [0.1, 0.9]]),
)


def _params(data: st.DataObject, names: list[str]) -> dict:
    """Some of `names` (the method's own, so that most plans get past the schema), any values."""
    return data.draw(st.dictionaries(st.sampled_from(names), values, max_size=3)) if names else {}


def _misspell(data: st.DataObject, mapping: dict) -> None:
    """Rename one key of `mapping` (drop, double or swap a letter), in place."""
    if not mapping:
        return
    key = data.draw(st.sampled_from(sorted(mapping)))
    i = data.draw(st.integers(0, len(key) - 1))
    edit = data.draw(st.sampled_from(["drop", "double", "swap"]))
    new = {"drop": key[:i] + key[i + 1 :], "double": key[:i] + key[i] + key[i:],
           "swap": key[:i] + key[i + 1 : i + 2] + key[i : i + 1] + key[i + 2 :]}[edit]  # fmt: skip
    if new and new not in mapping:
        mapping[new] = mapping.pop(key)


def _lfm_plan(data: st.DataObject) -> dict:
    models = data.draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=3))
    entries = [
        m if data.draw(st.booleans()) else {"path": m, "weight": data.draw(weights)} for m in models
    ]
    method = data.draw(st.sampled_from(KERNELS))
    fields = sorted(kernel_spec(method).config.model_fields)
    plan = {"method": method, "models": entries, "parameters": _params(data, fields)}
    if data.draw(st.integers(0, 3)):
        plan["base"] = "base.safetensors"
    return plan


def _mergekit_plan(data: st.DataObject) -> dict:
    models = data.draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=3))
    per_model = st.fixed_dictionaries({}, optional={"weight": weights, "density": values})
    entries = [{"model": m, "parameters": data.draw(per_model)} for m in models]
    method = data.draw(st.sampled_from(MERGEKIT_METHODS))
    names = [n for n in MERGEKIT_METHOD_PARAMETERS[method] if n != "weight"]
    plan = {"merge_method": method, "models": entries, "parameters": _params(data, names),
            "dtype": "float32"}  # fmt: skip
    if data.draw(st.integers(0, 3)):
        plan["base_model"] = "base.safetensors"
    return plan


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # no example database written into the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_plan_merges_to_finite_weights_or_fails_in_one_line(folder, data):
    plan = _mergekit_plan(data) if data.draw(st.booleans()) else _lfm_plan(data)
    where = data.draw(st.sampled_from(["none", "none", "none", "top", "model", "parameters"]))
    if where == "top":
        _misspell(data, plan)
    elif where == "model" and isinstance(plan["models"][0], dict):
        _misspell(data, plan["models"][0])
    elif where == "parameters":
        _misspell(data, plan["parameters"])
    work = Path(tempfile.mkdtemp(dir=folder))
    try:
        path = work / "plan.yaml"
        path.write_text(yaml.safe_dump(plan))
        for name in ("base.safetensors", *MODELS):
            (work / name).symlink_to(folder / name)
        try:
            _, out, _ = merge_plan(path, work / "out", progress=False, root=work / "runs")
        except LfmError as e:  # one line, and so is every problem a plan's error lists
            assert "\n" not in str(e) and str(e)
            assert all(line and "\n" not in line for line in getattr(e, "problems", []))
            assert not (work / "out").exists()
            return
        merged = load_file(out / "model.safetensors")
        assert merged and all(bool(torch.isfinite(t).all()) for t in merged.values()), plan
    finally:
        shutil.rmtree(work, ignore_errors=True)
