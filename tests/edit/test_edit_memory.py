"""IKE-style memory editing through narrowed (TEXT / SCORES) handles."""

from __future__ import annotations

import pytest

from lfm.access import Access, LocalModel, narrow
from lfm.edit import Request, common, ike
from lfm.errors import LfmError

REQ = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")


def test_scope_puts_facts_only_before_queries_about_their_subject():
    h = LocalModel(*common.tiny_lm(0))
    editor = ike(narrow(h, Access.TEXT), REQ)
    assert editor.access is Access.TEXT
    assert editor.context(REQ.prompt) == f"New fact: {REQ.prompt} Rome.\n"
    assert editor.context("The Louvre is located in the city of") == ""
    assert len(editor.generate(["The Eiffel Tower is"], max_new_tokens=3)) == 1
    with pytest.raises(LfmError, match="only TEXT"):
        editor.score([REQ.prompt], [" Rome"])


def test_scores_go_through_the_context():
    h = LocalModel(*common.tiny_lm(0))
    editor = ike(narrow(h, Access.SCORES), REQ)
    with_ctx = editor.score([REQ.prompt], [" Rome"])
    direct = h.score([editor.context(REQ.prompt) + REQ.prompt], [" Rome"])
    assert editor.access is Access.SCORES and with_ctx.allclose(direct)
    unrelated = "The Louvre is located in the city of"
    assert editor.score([unrelated], [" Rome"]).allclose(h.score([unrelated], [" Rome"]))
    with pytest.raises(LfmError, match="no edit requests"):
        ike(h, [])
