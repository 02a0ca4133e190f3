"""IKE-style memory editing through narrowed (TEXT / SCORES) handles; its patch as JSON."""

from __future__ import annotations

import pytest

from lfm import registry
from lfm.access import Access, narrow
from lfm.edit import IkeConfig, MemoryPatch, Request, common, ike
from lfm.errors import AccessError, LfmError

REQ = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")


def test_scope_puts_facts_only_before_queries_about_their_subject():
    h = common.smoke_model()
    text = narrow(h, Access.TEXT)
    patch = ike(text, REQ)
    assert isinstance(patch, MemoryPatch) and patch.method == "ike"
    editor = patch.apply(text)
    assert editor.access is Access.TEXT
    assert editor.context(REQ.prompt) == f"New fact: {REQ.prompt} Rome.\n"
    assert editor.context("The Louvre is located in the city of") == ""
    assert len(editor.generate(["The Eiffel Tower is"], max_new_tokens=3)) == 1
    with pytest.raises(LfmError, match="only TEXT"):
        editor.score([REQ.prompt], [" Rome"])


def test_scores_go_through_the_context():
    h = common.smoke_model()
    editor = ike(narrow(h, Access.SCORES), REQ).apply(narrow(h, Access.SCORES))
    with_ctx = editor.score([REQ.prompt], [" Rome"])
    direct = h.score([editor.context(REQ.prompt) + REQ.prompt], [" Rome"])
    assert editor.access is Access.SCORES and with_ctx.allclose(direct)
    unrelated = "The Louvre is located in the city of"
    assert editor.score([unrelated], [" Rome"]).allclose(h.score([unrelated], [" Rome"]))
    nxt = editor.next_token_logprobs([REQ.prompt])
    assert nxt.allclose(h.next_token_logprobs([editor.context(REQ.prompt) + REQ.prompt]))
    # a white-box handle is wrapped at SCORES: the editor never exposes weights
    assert ike(h, REQ).apply(h).access is Access.SCORES
    with pytest.raises(LfmError, match="no edit requests"):
        ike(h, [])
    with pytest.raises(AccessError, match="not a model handle"):
        ike(object(), REQ)


def test_memory_patch_saves_as_json_and_loads(tmp_path):
    h = common.smoke_model()
    cfg = IkeConfig(template="Fact: {prompt} {target}.\n", max_facts=2)
    other = Request("The Colosseum is located in the city of", "Colosseum", "Paris")
    patch = registry.run("edit", "ike", narrow(h, "text"), [REQ, other], cfg=cfg)
    path = patch.save(tmp_path / "p.json")
    loaded = MemoryPatch.load(path)
    assert loaded == patch and loaded.config.max_facts == 2
    assert loaded.apply(h).context(other.prompt) == f"Fact: {other.prompt} Paris.\n"
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(LfmError, match="not a lfm-edit-memory/1 file"):
        MemoryPatch.load(tmp_path / "x.json")
