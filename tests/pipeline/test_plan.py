"""`lfm plan`: what a target exposes, and which methods run through it."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI

from lfm import registry
from lfm.access import Access, LocalModel
from lfm.core.tiny import tiny_lm
from lfm.errors import AccessError, LfmError
from lfm.pipeline import plan, probe
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


def test_task_order_comes_from_the_table_the_benchmarks_write(tmp_path, monkeypatch):
    import importlib

    plan_module = importlib.import_module("lfm.pipeline.plan")

    table = tmp_path / "measured.json"
    monkeypatch.setattr(plan_module, "MEASURED", table)
    plan_module.record("edit/memit", 80.0, "Score 80", "bench", path=table)
    plan_module.record("edit/rome", 90.0, "Score 90", "bench", path=table)
    plan_module.record("edit/memit", 95.0, "Score 95", "bench again", path=table)  # replaces
    p = plan_module.plan("smollm2-135m", task="edit")
    keys = [e.key for e in p.entries]
    assert keys[:2] == ["edit/memit", "edit/rome"]  # measured, best first; the rest after
    assert p.entries[0].figures["summary"] == "Score 95"
    assert json.loads(table.read_text())["rows"][0]["command"] == "bench again"
