"""IKE through narrowed (TEXT / SCORES) handles: retrieved copy, update and retain demonstrations
before the new fact; its patch as JSON."""

from __future__ import annotations

import importlib

import pytest
import torch

from lfm import registry
from lfm.access import Access, narrow
from lfm.edit import IkeConfig, MemoryPatch, Request, common, ike
from lfm.edit.facts import load_facts
from lfm.edit.memory import SMOKE_FACTS, Demo, char_embedder, demonstrations, quotas, select
from lfm.errors import AccessError, LfmError

memory = importlib.import_module("lfm.edit.memory")
REQ = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
CFG = IkeConfig(k=8, encoder="chars")
FACTS = load_facts()[:12]


def _kinds(editor, query: str) -> set[str]:
    return {d.kind for d, _ in editor.demonstrations(query)}


class Recorder:
    """A TEXT handle that records what it is asked and answers "Rome"."""

    access = Access.TEXT
    name = "recorder"

    def __init__(self):
        self.seen: list[str] = []

    def generate(self, prompts, max_new_tokens=32, **kw):
        self.seen += list(prompts)
        return [" Rome"] * len(prompts)


def test_three_kinds_ordered_by_similarity_and_the_new_fact_last():
    api = Recorder()
    editor = ike(api, REQ, CFG, embed=char_embedder, facts=FACTS).apply(api)
    demos = editor.demonstrations(REQ.prompt)
    assert [d.kind for d, _ in demos].count("copy") == 1  # 8 in 1:3:4
    assert _kinds(editor, REQ.prompt) == {"copy", "update", "retain"}
    sims = [s for _, s in demos]
    assert sims == sorted(sims) and len(demos) == 8  # the most similar nearest the query
    # no demonstration names the edited subject (the Eiffel Tower is other facts' neighbour)
    assert all("Eiffel" not in d.query and "Eiffel" not in d.fact for d, _ in demos)
    retain = [d for d, _ in demos if d.kind == "retain"]
    assert all(d.answer != f.new for d in retain for f in FACTS if d.fact.startswith(f.prompt))
    editor.generate([REQ.prompt], max_new_tokens=3)
    (seen,) = api.seen  # the model sees demonstrations, then the new fact, then the query
    head = f"New Fact: {REQ.prompt} Rome\nPrompt: {REQ.prompt}"
    assert seen.endswith(head) and seen.startswith(demos[0][0].text)
    assert seen.count("New Fact:") == 9


def test_selection_follows_similarity_within_each_kind():
    kinds = ["copy", "update", "update", "retain", "retain", "retain"]
    sims = torch.tensor([0.1, 0.9, 0.2, 0.5, 0.8, 0.3])
    assert quotas(4, (1, 1, 2)) == [1, 1, 2] and quotas(8, (1, 3, 4)) == [1, 3, 4]
    assert quotas(5, (1, 3, 4)) == [1, 2, 2]
    assert select(sims, kinds, 4, (1, 1, 2)) == [0, 3, 4, 1]  # 0.1 < 0.5 < 0.8 < 0.9


def test_without_demonstrations_the_kinds_are_missing(monkeypatch):
    """The demonstrations removed: the first test above would fail."""
    monkeypatch.setattr(memory, "select", lambda *a, **k: [])
    editor = ike(Recorder(), REQ, CFG, embed=char_embedder, facts=FACTS).apply(Recorder())
    assert _kinds(editor, REQ.prompt) == set()
    assert editor.context(REQ.prompt) == f"New Fact: {REQ.prompt} Rome\nPrompt: "


def test_demonstrations_are_built_from_the_fact_set():
    eiffel = FACTS[0]
    demos = demonstrations([eiffel])
    assert demos[0] == Demo("copy", f"{eiffel.prompt} {eiffel.new}", eiffel.prompt, eiffel.new)
    assert [d.kind for d in demos] == ["copy"] + ["update"] * len(eiffel.paraphrases) + [
        "retain"
    ] * len(eiffel.neighbourhood)
    assert {d.answer for d in demos if d.kind == "retain"} == {eiffel.true}
    assert demonstrations([eiffel], [eiffel.subject]) == []


def test_scores_go_through_the_context():
    h = common.smoke_model()
    scores = narrow(h, Access.SCORES)
    cfg = IkeConfig(k=4, encoder="chars")
    editor = ike(scores, REQ, cfg, facts=SMOKE_FACTS).apply(scores)
    assert editor.access is Access.SCORES and _kinds(editor, REQ.prompt) == set(memory.KINDS)
    with_ctx = editor.score([REQ.prompt], [" Rome"])
    assert with_ctx.allclose(h.score([editor.context(REQ.prompt) + REQ.prompt], [" Rome"]))
    assert not with_ctx.allclose(h.score([REQ.prompt], [" Rome"]))  # the model sees the fact
    nxt = editor.next_token_logprobs([REQ.prompt])
    assert nxt.allclose(h.next_token_logprobs([editor.context(REQ.prompt) + REQ.prompt]))
    assert ike(h, REQ).apply(h).access is Access.SCORES  # a white-box handle is wrapped at SCORES
    text = ike(narrow(h, "text"), REQ, cfg, facts=SMOKE_FACTS).apply(narrow(h, "text"))
    with pytest.raises(LfmError, match="only TEXT"):
        text.score([REQ.prompt], [" Rome"])
    with pytest.raises(LfmError, match="no edit requests"):
        ike(h, [])
    with pytest.raises(AccessError, match="not a model handle"):
        ike(object(), REQ)


def test_the_nearest_stored_fact_goes_before_a_query():
    other = Request("The Colosseum is located in the city of", "Colosseum", "Paris")
    editor = ike(Recorder(), [REQ, other], CFG, embed=char_embedder, facts=FACTS).apply(Recorder())
    assert editor.context(other.prompt).endswith(f"New Fact: {other.prompt} Paris\nPrompt: ")
    assert editor.context(REQ.prompt).endswith(f"New Fact: {REQ.prompt} Rome\nPrompt: ")


def test_memory_patch_saves_as_json_and_loads(tmp_path):
    h = common.smoke_model()
    cfg = IkeConfig(k=2, ratio=(0, 1, 1), encoder="chars")
    patch = registry.run("edit", "ike", narrow(h, "text"), [REQ], cfg=cfg)
    path = patch.save(tmp_path / "p.json")
    loaded = MemoryPatch.load(path)
    assert loaded == patch and loaded.config.ratio == (0, 1, 1)
    editor = loaded.apply(h)  # the packaged facts and the chars encoder, from the config
    assert _kinds(editor, REQ.prompt) == {"update", "retain"}
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(LfmError, match="not a lfm-edit-memory/1 file"):
        MemoryPatch.load(tmp_path / "x.json")


def test_cli_applies_and_evaluates_ike(tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    folder = tmp_path / "tiny"
    lm = common.smoke_model()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    (tmp_path / "c.yaml").write_text("k: 2\nencoder: chars\n")
    req = common.SMOKE_REQUEST
    args = ["--prompt", req.prompt, "--subject", req.subject, "--target", req.target]
    out, root = tmp_path / "p.json", str(tmp_path / "runs")
    res = CliRunner().invoke(app, ["apply", str(folder), "-m", "ike", *args, "--config",
                                   str(tmp_path / "c.yaml"), "-o", str(out), "--root", root])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "ike: 1 edit(s) on the context" in res.output
    assert MemoryPatch.load(out).config.k == 2
    res = CliRunner().invoke(app, ["eval", str(folder), str(out), "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    editor = MemoryPatch.load(out).apply(lm)
    want = float(lm.score([editor.context(req.prompt) + req.prompt], [" Rome"]))
    assert abs(float(res.output.strip().splitlines()[-1].split("=")[-1]) - want) < 1e-3
