"""`lfm plan`: what a target exposes, and which methods run through it."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi import FastAPI
from safetensors.torch import save_file

from lfm import registry
from lfm.access import Access, LocalModel
from lfm.core.tiny import tiny_lm
from lfm.errors import AccessError, LfmError
from lfm.pipeline import Interface, plan, probe
from lfm.pipeline.plan import model_kinds
from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.thread import running


@pytest.fixture(scope="module")
def lm():
    return LocalModel(*tiny_lm("llama", 0))


@pytest.fixture(scope="module", params=["text", "scores"])
def served(request, lm):
    app = build_app(Backend(lm, request.param), ServeSettings(api_key="k"))
    with running(app) as url:
        yield Access.parse(request.param), url


def test_a_served_model_lists_exactly_the_methods_of_its_level(served):
    level, url = served
    p = plan(url, api_key="k")
    assert p.interface.kind == "lfm server" and p.interface.access is level
    listed = {e.key for e in p.runnable}
    lm = {s.key for s in registry.methods() if "causal-lm" in (model_kinds(s) or ("causal-lm",))}
    assert listed == {s.key for s in registry.methods() if s.access <= level} & lm
    for e in p.entries:
        if not e.runnable and e.needs > level:
            assert e.why == f"needs {e.needs.name}, the target gives {level.name}"
        elif not e.runnable:
            assert e.why.startswith("works on vision models")


def test_each_listed_method_runs_through_a_handle_of_that_level_and_the_rest_are_refused(served):
    """The plan's promise, kept: a listed method runs through exactly that level; others fail."""
    level, url = served
    p = plan(url, api_key="k")
    for e in p.entries:
        spec = registry.get(e.key)
        ex = spec.example(level, 0)
        if e.runnable:
            assert registry.run(e.key, *ex.args, cfg=ex.cfg, **ex.kwargs) is not None, e.key
        elif e.needs > level:
            with pytest.raises(AccessError, match=f"needs {spec.access.name}"):
                registry.run(e.key, *ex.args, cfg=ex.cfg, **ex.kwargs)


def test_a_white_box_asset_is_not_loaded_and_gives_everything(monkeypatch):
    monkeypatch.setattr("lfm.assets.load_model", lambda *a, **k: pytest.fail("loaded"))
    p = plan("smollm2-135m")
    assert p.interface.kind == "asset" and p.interface.access is Access.WEIGHTS
    assert {e.key for e in p.entries if not e.runnable} == {
        s.key
        for s in registry.methods()
        if model_kinds(s) is not None and "causal-lm" not in model_kinds(s)
    }
    assert {"edit/rome", "tuning/lora", "reuse/ties"} <= {e.key for e in p.runnable}


def test_an_adapter_folder_and_a_model_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": "smollm2-135m",
                "task_type": "CAUSAL_LM",
            }
        )
    )
    i = probe(str(tmp_path))
    assert i.kind == "adapter" and i.access is Access.WEIGHTS and i.facts["base"] == "smollm2-135m"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    assert probe(str(model)).model == "causal-lm"
    with pytest.raises(LfmError, match="neither an asset"):
        probe(str(tmp_path / "nothing"))


def _openai_app(top: int, echo: bool) -> FastAPI:
    """An OpenAI-compatible stand-in: completions, and prompt log-probabilities if `echo`."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        choice: dict = {"text": " Paris", "index": 0}
        if echo and body.get("echo") and body.get("logprobs"):
            k = min(int(body["logprobs"]), top)
            tops = [None] + [{f"t{j}": -1.0 - j for j in range(k)} for _ in range(3)]
            choice["logprobs"] = {"token_logprobs": [None, -1.2, -0.5, -2.0], "top_logprobs": tops}
        return {"choices": [choice]}

    return app


def test_an_openai_server_is_probed_for_prompt_logprobs_and_their_width():
    with running(_openai_app(top=5, echo=True)) as url:
        i = probe(url)
    assert i.kind == "openai server" and i.access is Access.SCORES and i.facts["top_k"] == 5
    with running(_openai_app(top=5, echo=False)) as url:
        i = probe(url)
    assert i.access is Access.TEXT and not i.facts.get("prompt_logprobs")


def test_tasks_narrow_and_unknown_tasks_are_refused():
    p = plan("smollm2-135m", task="edit")
    assert p.entries and all(e.area == "edit" for e in p.entries)
    with pytest.raises(LfmError, match="unknown task 'cook'"):
        plan("smollm2-135m", task="cook")


def test_the_cli_prints_json(served):
    from typer.testing import CliRunner

    from lfm.cli import _mount_areas

    level, url = served
    res = CliRunner().invoke(_mount_areas(["plan"]), ["plan", url, "--api-key", "k", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["interface"]["access"] == level.name
    assert {m["method"] for m in data["methods"] if m["runnable"]} == {
        e.key for e in plan(url, api_key="k").runnable
    }


@pytest.fixture
def empty_table(tmp_path, monkeypatch):
    """`lfm.pipeline.plan` reading (and benchmarks writing) an empty table in `tmp_path`."""
    import importlib

    plan_module = importlib.import_module("lfm.pipeline.plan")
    table = tmp_path / "measured.json"
    monkeypatch.setattr(plan_module, "MEASURED", table)
    return plan_module, table


def test_task_order_comes_from_the_table_the_benchmarks_write(empty_table):
    plan_module, table = empty_table
    where = {"model": "smollm2-135m", "unit": "fact", "units": 10, "path": table}
    plan_module.record("edit/memit", 80.0, "Score 80", "bench", **where)
    plan_module.record("edit/rome", 90.0, "Score 90", "bench", **where)
    plan_module.record("edit/memit", 95.0, "Score 95", "bench again", **where)  # replaces
    p = plan_module.plan("smollm2-135m", task="edit")
    keys = [e.key for e in p.entries]
    assert keys[:2] == ["edit/memit", "edit/rome"]  # measured, best first; the rest after
    assert p.entries[0].figures["summary"] == "Score 95"
    rows = json.loads(table.read_text())["rows"]
    assert [r["command"] for r in rows] == ["bench again", "bench"]


def _measured(cpu_s=20.0, calls=60, peak_mib=300.0):
    from lfm.core.measure import Measured

    return Measured(cpu_s=cpu_s, wall_s=2 * cpu_s, calls=calls, peak_mib=peak_mib)


def test_estimates_scale_the_measured_cost_per_unit(tmp_path, empty_table):
    """Calls and CPU time per unit times the size; another model scales by parameter count."""
    plan_module, table = empty_table
    # 10 facts cost 20 CPU-s and 60 forward calls on a model of 1,000 parameters
    plan_module.record("edit/rome", 90.0, "Score 90", "bench", model="small", unit="fact",
                       units=10, cost=_measured(), params=1000, path=table)  # fmt: skip
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"w": torch.zeros(50, 40), "ids": torch.zeros(7, dtype=torch.int64)},
              str(folder / "model.safetensors"))  # fmt: skip
    assert probe(str(folder)).facts["params"] == 2000  # floating tensors only, from the header

    p = plan_module.plan(str(folder), task="edit", size=30)
    est = next(e for e in p.entries if e.key == "edit/rome").estimate
    assert est["calls"] == 180  # 6 per fact x 30
    assert est["cpu_s"] == pytest.approx(2.0 * 30 * 2)  # 2 CPU-s per fact x 30 x (2000 / 1000)
    assert est["peak_mib"] == pytest.approx(600.0)
    assert est["scaled"] and est["from"] == "small"
    # a toy model's figures are not scaled to a model 100x its size: they say nothing about it
    big = Interface(str(folder), "model folder", Access.WEIGHTS, "causal-lm",
                                       {"params": 100_000})  # fmt: skip
    row = plan_module.measured(table)["edit/rome"]
    far = plan_module.estimate(row, 30, big)
    assert (
        far["scale"] is None and far["cpu_s"] == pytest.approx(60.0) and far["from_params"] == 1000
    )
    # a method never measured has no estimate rather than a made-up one
    assert next(e for e in p.entries if e.key == "edit/ft_l").estimate == {}
    # without a parameter count for the target, the figures stay as measured, and say so
    q = plan_module.plan("smollm2-135m", task="edit", size=30)
    est = next(e for e in q.entries if e.key == "edit/rome").estimate
    assert est["cpu_s"] == pytest.approx(60.0) and est["scale"] is None and not est["scaled"]


def test_a_row_on_the_target_model_is_preferred(empty_table):
    plan_module, table = empty_table
    for model, score, params in (("smollm2-135m", 70.0, 10), ("gemma3-270m", 90.0, 20)):
        plan_module.record("edit/rome", score, f"on {model}", "bench", model=model, unit="fact",
                           units=1, cost=_measured(), params=params, path=table)  # fmt: skip
    assert plan_module.measured(table, model="smollm2-135m")["edit/rome"]["score"] == 70.0
    assert plan_module.measured(table, model="gemma3-270m")["edit/rome"]["score"] == 90.0
    assert plan_module.measured(table)["edit/rome"]["model"] == "gemma3-270m"  # the larger
    rome = next(e for e in plan_module.plan("smollm2-135m", task="edit").entries
                if e.key == "edit/rome")  # fmt: skip
    assert rome.figures["summary"] == "on smollm2-135m" and rome.estimate["scale"] == 1.0


def test_size_needs_a_task_and_a_positive_count():
    with pytest.raises(LfmError, match="needs a task"):
        plan("smollm2-135m", size=5)
    with pytest.raises(LfmError, match=">= 1"):
        plan("smollm2-135m", task="edit", size=0)


def test_meter_counts_forward_calls_of_copies_too():
    import copy

    from lfm.core.measure import Meter

    net = torch.nn.Linear(3, 2)
    with Meter(net) as m:
        net(torch.zeros(1, 3))
        twin = copy.deepcopy(net)  # a λ search or a student started from the model
        twin(torch.zeros(1, 3))
        torch.nn.Linear(3, 2)(torch.zeros(1, 3))  # another module: not counted
    net(torch.zeros(1, 3))  # after the block: not counted
    assert m.result.calls == 2
    assert m.result.cpu_s >= 0 and m.result.wall_s > 0


def test_the_cli_prints_estimates_for_a_task(empty_table):
    from typer.testing import CliRunner

    from lfm.cli import _mount_areas

    plan_module, table = empty_table
    plan_module.record("edit/rome", 90.0, "Score 90", "bench", model="smollm2-135m", unit="fact",
                       units=10, cost=_measured(), params=1000, path=table)  # fmt: skip
    app = _mount_areas(["plan"])
    res = CliRunner().invoke(app, ["plan", "smollm2-135m", "--task", "edit", "--size", "30"],
                             env={"COLUMNS": "400"})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "≈ 180 calls, 60 CPU-s, 300 MiB for 30 facts" in res.output
    assert "not measured" in res.output  # the editors without figures
    bad = CliRunner().invoke(app, ["plan", "smollm2-135m", "--task", "edit", "--size", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_a_top_k_server_refuses_the_methods_that_need_whole_distributions(lm):
    """`lfm serve --top-k K`: full-row methods are refused with K named; the methods that read
    given continuations or the top k run, and run through a handle on that server."""
    from lfm.pipeline.plan import FULL_ROWS
    from lfm.serve.client import RemoteModel

    app = build_app(Backend(lm, "scores"), ServeSettings(top_k=3))
    with running(app) as url:
        p = plan(url)
        assert p.interface.facts["top_k"] == 3
        entries = {e.key: e for e in p.entries}
        for key in FULL_ROWS & set(entries):
            e = entries[key]
            assert not e.runnable and (e.why.endswith("sends its top 3") or
                                       e.why.startswith("works on vision")), (key, e.why)  # fmt: skip
        assert (
            not entries["tuning/replug"].runnable and not entries["reuse/ensemble_average"].runnable
        )
        for key in ("distill/topk_lm", "distill/gkd", "tuning/prompt_search", "edit/ike"):
            assert entries[key].runnable, (key, entries[key].why)
        # what the plan lists runs through the top-k server: top-k KD at k = K
        remote = RemoteModel(url)
        spec = registry.get("distill/topk_lm")
        ex = spec.example(Access.SCORES, 0)
        res = registry.run("distill/topk_lm", remote, *ex.args[1:], cfg={"k": 3, "batch_size": 4},
                           **ex.kwargs)  # fmt: skip
        assert len(res.history.losses) == 3
    full = build_app(Backend(lm, "scores"))
    with running(full) as url:
        entries = {e.key: e for e in plan(url).entries}
        assert entries["tuning/replug"].runnable and entries["reuse/ensemble_average"].runnable


def test_top_k_by_token_id_is_refused_on_an_openai_server():
    with running(_openai_app(top=5, echo=True)) as url:
        entries = {e.key: e for e in plan(url).entries}
    assert (
        not entries["distill/topk_lm"].runnable
        and "token strings" in entries["distill/topk_lm"].why
    )
    assert not entries["tuning/replug"].runnable and entries["tuning/replug"].why.endswith("top 5")


def _rows(p) -> list[tuple]:
    return [(e.key, e.area, e.branch, e.needs, e.runnable, e.why) for e in p.entries]


@pytest.mark.parametrize("task", [None, "edit", "distill", "merge"])
def test_the_catalogue_places_every_method_as_the_registry_does(task):
    """`lfm plan` reads the methods from the catalogue (no method module imported); the plan is the
    one the live registry gives, for a white-box asset and for a top-k SCORES server."""
    from lfm.cli import catalogue
    from lfm.pipeline.plan import listed

    rows = listed(catalogue.read()["methods"])
    top_k = Interface("http://x", "lfm server", Access.SCORES, "causal-lm", {"top_k": 5})
    for target in ("smollm2-135m", top_k):
        live, read = plan(target, task), plan(target, task, methods=rows)
        assert _rows(read) == _rows(live) and live.entries
    # the extras that decide runnability travel in the catalogue
    by_key = {r.key: r for r in rows}
    assert by_key["tuning/opro"].extras["models"] == ["causal-lm"]
    assert by_key["reuse/ties"].shape.name == "kernel"


def test_the_plan_command_imports_no_method_module():
    from conftest import cli_run

    areas = ("lfm.tuning", "lfm.distill", "lfm.reuse", "lfm.meta", "lfm.edit")
    printed, modules = cli_run(["plan", "smollm2-135m", "--task", "edit"], areas)
    assert modules == [] and "rome" in printed
