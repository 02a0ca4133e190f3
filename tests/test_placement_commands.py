"""`--device` / `--dtype` of `lfm reuse merge|rebasin` and `lfm edit patch-apply|patch-revert`.

A device on the CPU-only test machine cannot be told from the CPU by its results, so the tests
check what the options do on the way: the merge's inputs and result pass through
`driver.to_device` with the chosen device (a spy that shifts them shows that the kernel computes
on what it returned), rebasin moves both models and writes from the CPU, patch-apply loads under
the chosen placement and forms ΔW on the weights' device. `--device cpu` gives the same bytes as
no option; a device this machine lacks is one line with exit status 2, before any run directory.
DARE, DELLA and Fisher run on the device too: their CPU-made masks and statistics are moved to it,
which the meta device shows under a mode that refuses any call mixing two devices.

`reuse merge --dtype` (and a mergekit plan's `out_dtype`) writes the floating tensors in that
dtype: the float32 merge rounded once, integer tensors as they are, config.json saying so (the
tiny Llama folder loads in it); an overflow, a conflict or a name that is no dtype is one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lfm import registry
from lfm.cli.edit import app as edit_app
from lfm.cli.reuse import app as reuse_app
from lfm.core import placement
from lfm.edit import common
from lfm.edit.patch import UNDO_FILE, Delta, make_patch
from lfm.reuse import driver, merge_state_dicts, recipes
from lfm.reuse.rebasin import apply_permutation, chain_spec

from conftest import SameDevice

NO_CUDA = not torch.cuda.is_available()
CPU = torch.device("cpu")
EDITED = "model.layers.0.mlp.down_proj"  # the module the test patches change


def _one_line_error(res, text: str) -> None:
    """Exit status 2 and one `error:` line holding `text`; besides it only `[lfm] ` stage lines."""
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith("[lfm] ")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error:") and text in lines[0], res.output


def _help(app, command: str) -> tuple[set[str], str]:
    """The long option names a command's `--help` lists, and the help's text."""
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return set(re.findall(r"^[│|\s]*(?:\*\s+)?(--[\w-]+)", res.output, re.MULTILINE)), res.output


# ---------------------------------------------------------------------------------------------
# the options each command has


@pytest.mark.parametrize(
    ("app", "command", "placement_options"),
    [
        (reuse_app, "merge", {"--device", "--dtype"}),
        (reuse_app, "rebasin", {"--device"}),
        (edit_app, "patch-apply", {"--device", "--dtype"}),
        (edit_app, "patch-revert", set()),
    ],
)
def test_each_command_has_the_placement_options_that_do_something(app, command, placement_options):
    options, text = _help(app, command)
    assert "--out" in options and options & {"--device", "--dtype"} == placement_options, text
    if command == "rebasin":  # the help says why it has no --dtype, patch-revert why neither
        assert "There is no `--dtype`" in text
    if command == "patch-revert":
        assert "No `--device` or `--dtype`: nothing is computed" in text


# ---------------------------------------------------------------------------------------------
# reuse merge


@pytest.fixture
def models(merge_files):
    return merge_files


def _plan(root: Path, method: str, with_base: bool | None = None, **params) -> Path:
    data = {"method": method, "models": ["a.safetensors", "b.safetensors"], "parameters": params}
    if with_base if with_base is not None else method != "linear":
        data["base"] = "base.safetensors"
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _merge(root: Path, plan: Path, out: str, *extra: str):
    args = ["merge", str(plan), "-o", str(root / out), "-q", "--root", str(root / "runs"), *extra]
    return CliRunner().invoke(reuse_app, args)


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.5}), ("linear", {})])
def test_merge_device_cpu_writes_the_same_bytes_and_records_the_device(models, method, params):
    root, _ = models
    plan = _plan(root, method, **params)
    assert _merge(root, plan, "plain").exit_code == 0
    res = _merge(root, plan, "placed", "--device", "cpu")
    assert res.exit_code == 0, res.output
    plain, placed = root / "plain" / "model.safetensors", root / "placed" / "model.safetensors"
    assert plain.read_bytes() == placed.read_bytes()
    run = Path(res.output.strip().splitlines()[-1].removeprefix("run: "))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["device"] == "cpu" and manifest["placement"]["device"] == "cpu"
    (first,) = (p for p in (root / "runs").iterdir() if p != run)  # the unplaced run: no device
    assert "device" not in json.loads((first / "manifest.json").read_text())["config"]


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_merge_on_a_device_this_machine_lacks_is_one_line(models):
    root, _ = models
    for extra in (["--device", "cuda"], ["--device", "cuda", "--check"]):
        res = _merge(root, _plan(root, "ties"), "m", *extra)
        _one_line_error(res, "no CUDA device")
    assert not (root / "m").exists() and not (root / "runs").exists()


class MoveSpy:
    """Stands in for `driver.to_device`: records each device and returns the tensor moved there
    plus 1, so the merged values show whether the kernel computed on what it returned."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def __call__(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.devices.append(device)
        return t.to(device) + 1


def test_merge_moves_each_tensors_inputs_to_the_device_and_the_result_back(models, monkeypatch):
    root, (_, a, b) = models
    spy = MoveSpy()
    monkeypatch.setattr(driver, "to_device", spy)
    plan = _plan(root, "linear")
    assert _merge(root, plan, "plain").exit_code == 0  # unchosen: nothing is moved
    assert spy.devices == []
    res = _merge(root, plan, "placed", "--device", "cpu")
    assert res.exit_code == 0, res.output
    # per tensor: its two inputs moved to the device, the merged result moved to the CPU
    assert spy.devices == [CPU] * 3 * len(a)
    got = load_file(root / "placed" / "model.safetensors")
    for k in a:  # the kernel averaged the moved inputs (+1 each), the result was moved (+1)
        torch.testing.assert_close(got[k], (a[k] + 1 + b[k] + 1) / 2 + 1)
    assert torch.equal(load_file(root / "plain" / "model.safetensors")["w"], (a["w"] + b["w"]) / 2)


def test_merge_device_from_python_by_argument_or_by_the_placement(models, monkeypatch):
    root, (_, a, _) = models
    spy = MoveSpy()
    monkeypatch.setattr(driver, "to_device", spy)
    plan, runs = _plan(root, "task_arithmetic"), root / "runs"
    recipes.merge_plan(plan, root / "none", progress=False, root=runs)
    assert spy.devices == []
    recipes.merge_plan(plan, root / "arg", progress=False, root=runs, device="cpu")
    assert spy.devices == [CPU] * 4 * len(a)  # per tensor: the base's, two models', the result
    with placement.placed("cpu"):  # as `--device cpu` sets it
        recipes.merge_plan(plan, root / "placed", progress=False, root=runs)
    assert spy.devices == [CPU] * 8 * len(a)
    with placement.placed(dtype="bfloat16"):  # a dtype alone chooses no device
        recipes.merge_plan(plan, root / "dtype", progress=False, root=runs)
    assert len(spy.devices) == 8 * len(a)


class RecordMoves:
    """Stands in for `driver.to_device`: records each device and moves the tensor there."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def __call__(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.devices.append(device)
        return t.to(device)


def _stats(root: Path, kind: str, tables: list[dict[str, torch.Tensor]], **meta) -> list[str]:
    from lfm.reuse.stats import save_stats

    return [str(save_stats(root / f"{kind}{i}.safetensors", t, kind, count=1, **meta))
            for i, t in enumerate(tables)]  # fmt: skip


def _fisher_plan(root: Path) -> Path:
    gen = torch.Generator().manual_seed(3)
    tables = [{"w": torch.rand(3, 4, generator=gen), "b": torch.rand(4, generator=gen)}
              for _ in range(2)]  # fmt: skip
    return _plan(root, "fisher", with_base=False,
                 stats=_stats(root, "fisher", tables, estimator="sample"))  # fmt: skip


@pytest.mark.parametrize(
    ("method", "params"),
    [("dare_ties", {"drop_rate": 0.5, "seed": 7}), ("della", {"drop_rate": 0.5, "seed": 7}),
     ("fisher", None)],
)  # fmt: skip
def test_formerly_cpu_kernels_run_on_the_device_with_the_same_result(models, monkeypatch, method,
                                                                     params):  # fmt: skip
    root, (_, a, _) = models
    spy = RecordMoves()
    monkeypatch.setattr(driver, "to_device", spy)
    plan = _fisher_plan(root) if params is None else _plan(root, method, **params)
    assert _merge(root, plan, "plain").exit_code == 0
    assert spy.devices == []
    res = _merge(root, plan, "placed", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "merged on the CPU" not in res.output
    # per tensor: the base's (not fisher's) and the two models' moved there, the result back
    moves = 3 if method == "fisher" else 4
    assert spy.devices == [CPU] * moves * len(a)
    plain, placed = root / "plain" / "model.safetensors", root / "placed" / "model.safetensors"
    assert plain.read_bytes() == placed.read_bytes()


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear", "fisher"])
def test_formerly_cpu_kernels_move_what_they_make_on_the_cpu_to_the_tensors_device(
    method, monkeypatch
):
    """On the meta device (a device other than the CPU, on a CPU-only machine), these kernels
    run with every CPU-made tensor (DARE's and DELLA's masks drawn by NumPy, DELLA's ranks and
    probabilities, Fisher's statistics) moved to the tensors' device: without the moves a call
    mixes devices. The results come back as zeros (a meta tensor holds no values)."""
    meta = torch.device("meta")
    back: list[torch.device] = []

    def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device == meta:
            return t.to(meta)
        back.append(t.device)
        return torch.zeros(t.shape, dtype=t.dtype)

    monkeypatch.setattr(driver, "to_device", move)
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (3, 4), "b": (4,), "col": (3, 1)}  # (3, 1): rows of one entry (DELLA's p)
    sds = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    fisher = method == "fisher"
    base = None if fisher else driver.DictReader(sds[0])
    inputs = driver.plan(base, [driver.DictReader(sd) for sd in sds[1:]])
    fishers = [{k: v.abs() for k, v in sd.items()} for sd in sds[1:]]
    stats = {"per_model": fishers} if fisher else None
    cfg = None if fisher else {"drop_rate": 0.5, "seed": 1}
    out: dict[str, torch.Tensor] = {}
    with SameDevice():
        driver.run_merge(method, inputs, cfg, out.__setitem__, stats=stats, device=meta)
    assert set(out) == set(shapes) and back == [meta] * len(shapes)  # each result came from meta
    with pytest.raises(AssertionError, match="mixes devices"), SameDevice():  # the mode bites
        torch.ones(2, device=meta).mul_(torch.ones(2))


def test_regmean_is_merged_on_the_cpu_with_a_note(models, monkeypatch):
    root, (_, a, b) = models
    spy = MoveSpy()
    monkeypatch.setattr(driver, "to_device", spy)
    kernels = {s.name for s in registry.methods("reuse") if s.shape.name == "kernel"}
    assert {"regmean"} == driver.CPU_KERNELS and kernels >= driver.CPU_KERNELS
    gen = torch.Generator().manual_seed(4)
    grams = []
    for _ in range(2):
        x = torch.randn(6, 4, generator=gen)
        grams.append({"w": x.T @ x})
    stats = _stats(root, "gram", grams, orientation={})
    plan = _plan(root, "regmean", with_base=False, stats=stats)
    res = _merge(root, plan, "m", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert spy.devices == [] and "regmean merged on the CPU, not on cpu" in res.output
    got = load_file(root / "m" / "model.safetensors")
    want = merge_state_dicts("regmean", None, [a, b], stats={"per_model": grams})
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# reuse merge --dtype


def _run_options(res) -> dict:
    run = Path(res.output.strip().splitlines()[-1].removeprefix("run: "))
    return json.loads((run / "manifest.json").read_text())["config"]


@pytest.fixture
def llamas(folder, tmp_path):
    """Three tiny Llama folders: the base (`folder`'s weights) and two fine-tuned models."""
    from shutil import copy2

    sd = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    paths = []
    for name, scale in (("base", 0.0), ("a", 0.02), ("b", 0.02)):
        path = tmp_path / name
        path.mkdir()
        for f in folder.iterdir():
            if f.name != "model.safetensors":
                copy2(f, path / f.name)
        tuned = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
        save_file(tuned, str(path / "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"method": "ties", "base": "base", "models": ["a", "b"],
                                    "parameters": {"density": 0.5}}))  # fmt: skip
    return tmp_path, plan


def test_merge_dtype_bfloat16_writes_the_float32_merge_rounded_and_loads_in_it(llamas):
    from transformers import AutoModelForCausalLM

    root, plan = llamas
    assert _merge(root, plan, "f32").exit_code == 0
    res = _merge(root, plan, "bf16", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    want = load_file(root / "f32" / "model.safetensors")
    got = load_file(root / "bf16" / "model.safetensors")
    assert got.keys() == want.keys() and {v.dtype for v in want.values()} == {torch.float32}
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)  # rounded once
    config = json.loads((root / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert json.loads((root / "f32" / "config.json").read_text())["dtype"] == "float32"
    assert _run_options(res)["dtype"] == "bfloat16"
    assert json.loads((root / "bf16" / "lfm_merge.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(root / "bf16")  # no dtype asked: config's
    assert model.dtype == torch.bfloat16
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], got[k]) for k in got)


def test_merge_dtype_keeps_integer_tensors_and_config_keys(models):
    root, sds = models
    step = torch.tensor([3, 1, 4], dtype=torch.int64)
    for name, sd in zip(("base", "a", "b"), sds, strict=True):  # an integer buffer in each
        save_file({**sd, "step": step}, str(root / f"{name}.safetensors"))
    (root / "config.json").write_text(json.dumps({"torch_dtype": "float32",
                                                  "text_config": {"dtype": "float32"}}))  # fmt: skip
    plan = _plan(root, "linear")
    assert _merge(root, plan, "f32").exit_code == 0
    res = _merge(root, plan, "f16", "--dtype", "fp16")
    assert res.exit_code == 0, res.output
    want = load_file(root / "f32" / "model.safetensors")
    got = load_file(root / "f16" / "model.safetensors")
    assert got["step"].dtype == torch.int64 and torch.equal(got["step"], step)
    assert got["w"].dtype == got["b"].dtype == torch.float16
    assert all(torch.equal(got[k], want[k].to(torch.float16)) for k in ("w", "b"))
    config = json.loads((root / "f16" / "config.json").read_text())
    assert config == {"torch_dtype": "float16", "text_config": {"dtype": "float16"}}
    assert _run_options(res)["dtype"] == "float16"


def test_merge_dtype_float16_overflow_is_one_line_and_nothing_is_written(models):
    root, sds = models
    for name, sd in zip(("a", "b"), sds[1:], strict=True):
        save_file({**sd, "w": torch.full((3, 4), 1e5)}, str(root / f"{name}.safetensors"))
    plan = _plan(root, "linear")
    _one_line_error(_merge(root, plan, "m", "--dtype", "float16"), "exceed its range")
    assert not (root / "m").exists()
    assert _merge(root, plan, "m32").exit_code == 0  # in the template's float32 it fits


def test_a_tensor_only_the_template_has_is_cast_and_checked_too():
    base = driver.DictReader({"w": torch.ones(2), "extra": torch.full((2,), 1e5)})
    inputs = driver.plan(base, [driver.DictReader({"w": torch.ones(2)})], on_missing="skip")
    out: dict[str, torch.Tensor] = {}
    driver.run_merge("task_arithmetic", inputs, None, out.__setitem__, dtype=torch.bfloat16)
    assert out["extra"].dtype == torch.bfloat16 and out["extra"][0] == 99840  # 1e5 rounded
    with pytest.raises(driver.MergeError, match=r"the copy of the base model .* exceed its range"):
        driver.run_merge("task_arithmetic", inputs, None, out.__setitem__, dtype=torch.float16)
    driver.run_merge("task_arithmetic", inputs, None, out.__setitem__, dtype=torch.float16,
                     allow_nonfinite=True)  # fmt: skip
    assert out["extra"].isinf().all() and out["w"].dtype == torch.float16


def _mergekit(root: Path, **extra) -> Path:
    data = {"merge_method": "linear", "models": [{"model": "a.safetensors",
            "parameters": {"weight": 1.0}}, {"model": "b.safetensors", "parameters": {"weight": 1.0}}],
            **extra}  # fmt: skip
    path = root / "mergekit.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_mergekit_out_dtype_is_the_written_dtype_and_dtype_without_it(models):
    root, (_, a, b) = models
    plan = _mergekit(root, out_dtype="bfloat16", dtype="float16")  # dtype: mergekit's compute dtype
    res = _merge(root, plan, "m")
    assert res.exit_code == 0, res.output
    got = load_file(root / "m" / "model.safetensors")
    assert all(torch.equal(got[k], ((a[k] + b[k]) / 2).to(torch.bfloat16)) for k in a)
    assert _run_options(res)["dtype"] == "bfloat16"
    assert _merge(root, plan, "same", "--dtype", "bf16").exit_code == 0  # the same dtype: fine
    alone = _merge(root, _mergekit(root, dtype="float16"), "alone")  # as mergekit: written in it
    assert alone.exit_code == 0 and _run_options(alone)["dtype"] == "float16"
    assert load_file(root / "alone" / "model.safetensors")["w"].dtype == torch.float16
    plain = _merge(root, _mergekit(root), "plain")  # neither: the template's dtypes
    assert plain.exit_code == 0 and "dtype" not in _run_options(plain)
    assert load_file(root / "plain" / "model.safetensors")["w"].dtype == torch.float32


def test_merge_dtype_that_differs_from_out_dtype_or_is_no_dtype_is_one_line(models):
    root, _ = models
    plan = _mergekit(root, out_dtype="bfloat16")
    for extra in (["--dtype", "float16"], ["--dtype", "float16", "--check"]):
        _one_line_error(_merge(root, plan, "m", *extra),
                        "--dtype float16 differs from the plan's out_dtype bfloat16")  # fmt: skip
    for extra, text in ((["--dtype", "int8"], "cannot write its output in 'int8'"),
                        (["--dtype", "int8", "--check"], "cannot write its output in 'int8'"),
                        (["--dtype", "auto", "--check"], "output dtype cannot be auto")):  # fmt: skip
        _one_line_error(_merge(root, _plan(root, "ties"), "m", *extra), text)
    _one_line_error(_merge(root, _mergekit(root, out_dtype="float64"), "m", "--check"),
                    "out_dtype: a merge cannot write its output in 'float64'")  # fmt: skip
    assert not (root / "m").exists() and not (root / "runs").exists()
    res = _merge(root, _mergekit(root, out_dtype="bfloat16"), "m", "--dtype", "bfloat16", "--check")
    assert res.exit_code == 0 and "the plan checks out" in res.output


# ---------------------------------------------------------------------------------------------
# reuse rebasin


@pytest.fixture
def pair(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perms = {"P0": torch.randperm(9), "P1": torch.randperm(7)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(apply_permutation(chain_spec(model), sd, perms), str(tmp_path / "b.safetensors"))
    return tmp_path, sd


def _rebasin(root: Path, out: str, *extra: str):
    args = ["rebasin", str(root / "a.safetensors"), str(root / "b.safetensors"), "-o",
            str(root / out), "--root", str(root / "runs"), *extra]  # fmt: skip
    return CliRunner().invoke(reuse_app, args)


def test_rebasin_device_cpu_moves_both_models_and_writes_the_same_bytes(pair, monkeypatch):
    root, sd = pair
    moved: list[torch.device] = []
    real = recipes.to_device

    def spy(tensors, device):
        moved.append(device)
        return real(tensors, device)

    costs: list[torch.device] = []
    from lfm.reuse import rebasin as rb

    real_cost = rb._cost

    def cost(spec, a, b, perms, p):
        costs.append(next(iter(a.values())).device)
        return real_cost(spec, a, b, perms, p)

    monkeypatch.setattr(recipes, "to_device", spy)
    monkeypatch.setattr(rb, "_cost", cost)
    assert _rebasin(root, "plain.safetensors").exit_code == 0
    assert moved == [CPU]  # unchosen: only the output's (no-op) move to the CPU
    res = _rebasin(root, "placed.safetensors", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert moved == [CPU, CPU, CPU, CPU] and set(costs) == {CPU}  # A, B there; the output back
    assert (root / "plain.safetensors").read_bytes() == (root / "placed.safetensors").read_bytes()
    got = load_file(root / "placed.safetensors")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    run = Path(res.output.strip().splitlines()[-1].removeprefix("run: "))
    assert json.loads((run / "manifest.json").read_text())["config"]["device"] == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_rebasin_on_a_device_this_machine_lacks_is_one_line(pair):
    root, _ = pair
    _one_line_error(_rebasin(root, "c.safetensors", "--device", "cuda"), "no CUDA device")
    assert not (root / "c.safetensors").exists() and not (root / "runs").exists()


def test_weight_matching_keeps_its_permutations_on_the_tensors_device(pair):
    from lfm.reuse.rebasin import chain_spec_from_state_dict, to_device, weight_matching

    root, sd = pair
    b = load_file(root / "b.safetensors")
    spec = chain_spec_from_state_dict(sd)
    perms = weight_matching(spec, to_device(sd, CPU), to_device(b, CPU))
    assert {p.device for p in perms.values()} == {CPU}
    assert torch.equal(perms["P0"].sort().values, torch.arange(9))


# ---------------------------------------------------------------------------------------------
# edit patch-apply and patch-revert


@pytest.fixture(scope="module")
def folder(smoke_folder):
    return smoke_folder


def _patch(folder: Path, path: Path, dtype: str) -> tuple[Path, torch.Tensor]:
    """A dense float32 ΔW for `EDITED`, made from the folder's weights loaded in `dtype`."""
    from lfm.assets import load_model

    model = load_model(str(folder), dtype=dtype).model
    w = model.get_submodule(EDITED).weight
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    patch = make_patch(model, [Delta(EDITED, dense=delta)], [common.SMOKE_REQUEST], "test", {})
    patch.save(path)
    return path, delta


def _apply(folder: Path, patch: Path, out: Path, *extra: str):
    args = ["patch-apply", str(patch), "--model", str(folder), "-o", str(out), "--root",
            str(out.parent / "runs"), *extra]  # fmt: skip
    return CliRunner().invoke(edit_app, args)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_patch_apply_in_bfloat16_and_revert_bit_for_bit(folder, tmp_path, monkeypatch):
    import lfm.assets

    loads, products = [], []
    real_load, real_matrix = lfm.assets.load_model, Delta.matrix

    def load(*args, **kw):
        loads.append(placement.current())
        return real_load(*args, **kw)

    def matrix(self, device=None):
        products.append(device)
        return real_matrix(self, device)

    patch, delta = _patch(folder, tmp_path / "p.safetensors", "bfloat16")
    model = real_load(str(folder), dtype="bfloat16").model
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(lfm.assets, "load_model", load)
    monkeypatch.setattr(Delta, "matrix", matrix)
    edited, restored = tmp_path / "edited", tmp_path / "restored"
    res = _apply(folder, patch, edited, "--device", "cpu", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    (at,) = loads  # the model loaded under the chosen placement; ΔW formed on its device
    assert at.device_chosen and at.device == CPU and at.dtype is torch.bfloat16
    assert products == [CPU]
    got, key = _weights(edited), f"{EDITED}.weight"
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert torch.equal(got[key], loaded[key].clone().add_(delta.to(torch.bfloat16)))
    assert all(torch.equal(got[k], loaded[k]) for k in got if k != key)
    undo = load_file(edited / UNDO_FILE)  # the originals: the weights as loaded, exactly
    assert undo[EDITED].dtype is torch.bfloat16 and torch.equal(undo[EDITED], loaded[key])
    # revert loads the folder in its originals' dtype, whatever the process default
    res = CliRunner().invoke(edit_app, ["patch-revert", str(edited), "-o", str(restored),
                                        "--root", str(tmp_path / "runs")])  # fmt: skip
    assert res.exit_code == 0, res.output
    back = _weights(restored)
    assert back.keys() == got.keys() and {t.dtype for t in back.values()} == {torch.bfloat16}
    assert all(torch.equal(back[k], loaded[k]) for k in back)


def test_patch_apply_refuses_a_patch_made_in_another_dtype(folder, tmp_path):
    patch, _ = _patch(folder, tmp_path / "p32.safetensors", "float32")
    res = _apply(folder, patch, tmp_path / "e", "--dtype", "bfloat16")
    _one_line_error(res, "loaded in the same dtype: --dtype")
    assert not (tmp_path / "e").exists()


def test_patch_apply_device_cpu_writes_the_same_folder(folder, tmp_path):
    patch, _ = _patch(folder, tmp_path / "p.safetensors", "float32")
    assert _apply(folder, patch, tmp_path / "plain").exit_code == 0
    res = _apply(folder, patch, tmp_path / "placed", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for name in ("model.safetensors", UNDO_FILE):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "placed" / name).read_bytes()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_patch_apply_on_a_device_this_machine_lacks_is_one_line(folder, tmp_path):
    res = _apply(folder, _patch(folder, tmp_path / "p.safetensors", "float32")[0],
                 tmp_path / "e", "--device", "cuda")  # fmt: skip
    _one_line_error(res, "no CUDA device")
    assert not (tmp_path / "e").exists() and not (tmp_path / "runs").exists()


def test_patch_revert_keeps_a_float32_folder_float32_under_another_default(folder, tmp_path):
    from lfm.edit.patch import revert_folder

    patch, _ = _patch(folder, tmp_path / "p.safetensors", "float32")
    assert _apply(folder, patch, tmp_path / "edited").exit_code == 0
    with placement.placed(dtype="float16"):  # a pipeline's placement, say: not the folder's
        revert_folder(tmp_path / "edited", tmp_path / "back")
    back, want = _weights(tmp_path / "back"), _weights(folder)
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
