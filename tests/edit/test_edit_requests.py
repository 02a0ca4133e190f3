"""Requests: validation and subject location across tokenizers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lfm.edit import common
from lfm.edit.requests import (
    Request,
    build_batch,
    read_requests,
    subject_end,
    subject_last_token,
    subject_range,
    target_ids,
)
from lfm.errors import LfmError

from conftest import make_lm


def test_bad_requests_are_refused_with_one_line():
    with pytest.raises(LfmError, match="does not occur"):
        Request("The Louvre is in", "Eiffel Tower", "Rome")
    with pytest.raises(LfmError, match="empty target"):
        Request("The Eiffel Tower is in", "Eiffel Tower", "  ")
    with pytest.raises(LfmError, match="empty subject"):
        Request("The Eiffel Tower is in", "", "Rome")
    with pytest.raises(LfmError, match="needs target"):
        Request.from_dict({"prompt": "x", "subject": "x"})


def test_subject_last_token_uses_offsets_and_last_occurrence():
    _, tok = make_lm("llama")
    text = "Paris is in France. Paris is the capital of"
    ids, pos = subject_last_token(tok, text, text.rfind("Paris") + len("Paris"))
    enc = tok(text, return_offsets_mapping=True)
    s, e = enc["offset_mapping"][pos]
    assert text[s:e].strip() and e >= text.rfind("Paris") + 1 and s < text.rfind("Paris") + 5
    assert ids[0] == tok.bos_token_id and pos > 5  # BOS counted; the second "Paris"


def test_batch_is_right_padded_and_targets_carry_their_space():
    _, tok = make_lm("gpt2")
    req = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris")
    batch = build_batch(tok, req, ["", "Here is a fact."])
    assert batch.attention_mask[0, -1] == 0 and batch.attention_mask[1].all()
    want = target_ids(tok, req.prompt, "Paris")
    assert batch.target_ids[0] == want and tok.decode(want).startswith(" ")
    assert batch.subject_pos[1] > batch.subject_pos[0]


def test_the_constructor_strips_the_target_as_from_dict_does():
    made = Request("The Eiffel Tower is in the city of", "Eiffel Tower", " London ")
    read = Request.from_dict(
        {"prompt": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower",
         "target": " London"}
    )  # fmt: skip
    assert made == read and made.target == "London"
    _, tok = make_lm("llama")
    # the target's tokens are read after the prompt with one space, not two
    assert target_ids(tok, made.prompt, made.target) == target_ids(tok, made.prompt, "London")


def test_a_request_that_is_not_a_mapping_is_one_line(tmp_path):
    with pytest.raises(LfmError, match="is a mapping"):
        Request.from_dict(["The Eiffel Tower is in", "Eiffel Tower", "Rome"])
    empty = tmp_path / "none.jsonl"
    empty.write_text("\n")
    with pytest.raises(LfmError, match="holds no edit requests"):
        read_requests(empty)
    with pytest.raises(LfmError, match="cannot read edit requests"):
        read_requests(tmp_path / "missing.jsonl")


def test_a_line_that_is_not_json_is_refused_naming_the_file(tmp_path):
    import re

    bad = tmp_path / "bad.jsonl"
    good = '{"prompt": "The Louvre is in", "subject": "Louvre", "target": "Rome"}'
    bad.write_text(f"{good}\nnot json\n")
    with pytest.raises(LfmError, match=rf"^{re.escape(str(bad))}: not JSON lines \(Expecting"):
        read_requests(bad)


def test_a_request_missing_fields_names_them_all():
    with pytest.raises(LfmError) as e:
        Request.from_dict({"prompt": "x"})
    assert str(e.value) == "an edit request needs subject, target; got keys ['prompt']"
    with pytest.raises(LfmError) as e:
        Request.from_dict({})
    assert str(e.value) == "an edit request needs prompt, subject, target; got keys []"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_each_rows_subject_position_is_the_subjects_last_token(kind):
    _, tok = make_lm(kind)
    req = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    batch = build_batch(tok, req, ["", "Here is a fact.", "A"])
    for row, pos in zip(batch.input_ids, batch.subject_pos.tolist(), strict=True):
        upto = tok.decode(row[: pos + 1].tolist(), skip_special_tokens=True)
        assert upto.endswith("Eiffel Tower"), upto  # the subject ends at that token, not later


def test_a_batch_without_targets_holds_the_prompt_alone():
    _, tok = make_lm("gpt2")
    req = Request("Paris is the capital of", "Paris", "the United Kingdom")  # a many-token target
    assert len(target_ids(tok, req.prompt, req.target)) > 1
    bare = build_batch(tok, req, ["", "A"], with_target=False)
    assert bare.target_pos == [[], []] and bare.target_ids == [[], []]
    full = build_batch(tok, req, ["", "A"])
    assert bare.input_ids.shape[1] < full.input_ids.shape[1]
    n = int(bare.attention_mask[0].sum())
    assert bare.input_ids[0, :n].tolist() == tok(req.prompt)["input_ids"]


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token():
    _, tok = make_lm("gpt2")
    bare = copy.deepcopy(tok)
    bare.pad_token = None
    assert bare.pad_token_id is None
    req = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    got, want = (build_batch(t, req, ["", "Here is a fact."]) for t in (bare, tok))
    assert torch.equal(got.attention_mask, want.attention_mask) and got.subject_pos.tolist() == (
        want.subject_pos.tolist()
    )
    padded = got.attention_mask == 0
    assert padded.any() and (got.input_ids[padded] == bare.eos_token_id).all()
    assert torch.equal(got.input_ids[~padded], want.input_ids[~padded])


def test_the_subject_is_its_last_occurrence_and_never_a_special_token():
    prompt = "Paris is in France. Paris is the capital of"
    assert subject_end(prompt, "Paris") == prompt.rfind("Paris") + 5 == 25
    _, tok = make_lm("llama")
    (pos,) = build_batch(tok, Request(prompt, "Paris", "France"), [""]).subject_pos.tolist()
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids[: pos + 1], skip_special_tokens=True) == "Paris is in France. Paris"

    def with_end_token(text, return_offsets_mapping=True):  # BOS and EOS have zero width
        return {"input_ids": [1, 5, 6, 7, 2], "offset_mapping": [(0, 0), (0, 3), (4, 9),
                                                                 (10, 12), (0, 0)]}  # fmt: skip

    assert subject_last_token(with_end_token, "The Tower is", 9) == ([1, 5, 6, 7, 2], 2)
    with pytest.raises(LfmError) as e:  # no token starts before the subject's end
        subject_last_token(with_end_token, "The Tower is", 0)
    offsets = "[(0, 0), (0, 3), (4, 9), (10, 12), (0, 0)]"
    assert str(e.value) == f"cannot locate the subject in 'The Tower is' (offsets {offsets})"


def test_target_ids_are_read_from_the_joint_text_unless_the_prompt_merges_into_the_target():
    table = {
        "The city of": [1, 2, 3], "The city of Paris": [1, 2, 3, 7], " Paris": [8],
        "The town of": [1, 4, 5], "The town of Rome": [1, 4, 9, 6], " Rome": [10],
        "The town of \u00ad": [1, 4, 5], " \u00ad": [11],  # a soft hyphen the joint text drops
    }  # fmt: skip

    def tok(text, add_special_tokens=True):
        return {"input_ids": table[text]}

    assert target_ids(tok, "The city of", "Paris") == [7]  # as read after the prompt
    assert target_ids(tok, "The town of", "Rome") == [10]  # "of Rome" merged: alone, with a space
    assert target_ids(tok, "The town of", "\u00ad") == [11]  # never an empty target
    # the fallback reads the target as a real tokenizer does, without its BOS
    _, real = make_lm("llama")

    def merging(text, **kw):
        return {"input_ids": [5, 6]} if text == "The town of Rome" else real(text, **kw)

    alone = real(" Rome", add_special_tokens=False)["input_ids"]
    assert real.bos_token_id not in alone and target_ids(merging, "The town of", "Rome") == alone


def test_a_model_without_its_tokenizer_is_refused_by_name():
    with pytest.raises(LfmError) as e:
        common.model_and_tokenizer(nn.Linear(2, 2), "ROME")
    assert str(e.value) == "ROME needs a LocalModel (a model with its tokenizer), not a Linear"


def test_requests_come_as_one_a_mapping_or_a_list_of_either():
    req = Request("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    row = {"prompt": "Paris is the capital of", "subject": "Paris", "target": "Italy"}
    assert common.as_requests(req) == [req]
    assert common.as_requests(row) == [Request.from_dict(row)]
    got = common.as_requests((req, row))
    assert got == [req, Request.from_dict(row)] and got[0] is req
    with pytest.raises(LfmError) as e:
        common.as_requests([])
    assert str(e.value) == "no edit requests given"


def test_a_field_that_is_not_text_is_named():
    with pytest.raises(LfmError) as e:
        Request("The Eiffel Tower is in", "Eiffel Tower", 3)  # type: ignore[arg-type]
    assert str(e.value) == "edit request target must be text, not 3"
    with pytest.raises(LfmError) as e:
        Request(None, "Eiffel Tower", "Rome")  # type: ignore[arg-type]
    assert str(e.value) == "edit request prompt must be text, not None"


def test_each_unusable_request_says_exactly_why():
    cases = [
        (("The Eiffel Tower is in", " ", "Rome"), "edit request has an empty subject"),
        (("The Louvre is in", "Eiffel Tower", "Rome"),
         "subject 'Eiffel Tower' does not occur in prompt 'The Louvre is in'"),
        (("The Eiffel Tower is in", "Eiffel Tower", " "),
         "edit request for 'Eiffel Tower' has an empty target"),
        (("The Eiffel Tower is in ", "Eiffel Tower", "Rome"),
         "prompt 'The Eiffel Tower is in ' ends with whitespace; the target adds its own space"),
    ]  # fmt: skip
    for args, why in cases:
        with pytest.raises(LfmError) as e:
            Request(*args)
        assert str(e.value) == why


def test_the_subject_range_starts_at_its_first_character_and_ends_after_its_last():
    """Every token holding a character of the last occurrence of the subject, and none of the
    punctuation touching it (a token that ends where the subject starts is not the subject's)."""
    tok = common.smoke_model("llama", 1).tokenizer
    cases = {  # prompt -> [start, end) tokens; <bos> is token 0
        "The Eiffel Tower is in the city of": (2, 4),  # " Eiffel", " Tower"
        '"Eiffel Tower" is in the city of': (2, 5),  # "Ei", "ffel", " Tower", not the quote
        "The (Eiffel Tower) is in the city of": (4, 7),  # after "(", before ")"
        "Eiffel Tower, the Eiffel Tower, is in": (6, 8),  # the last occurrence
    }
    for prompt, span in cases.items():
        ids, start, end = subject_range(tok, prompt, "Eiffel Tower")
        assert ids == tok(prompt)["input_ids"] and (start, end) == span, prompt
        text = tok.decode(ids[start:end]).strip()
        assert text == "Eiffel Tower", (prompt, text)
