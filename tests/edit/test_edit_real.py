"""A real edit on SmolLM2 (slow: uses the offline model and the BBC statistics)."""

from __future__ import annotations

import pytest
import torch

from lfm.edit import Request, RomeConfig, rome
from lfm.edit.requests import subject_last_token


@pytest.mark.slow
def test_rome_moves_the_eiffel_tower_and_keeps_paris_capital_of_france():
    from lfm.assets import load_model

    h = load_model("smollm2-135m")
    req = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    other = "The Louvre museum is located in the city of"

    def p(prompt: str, obj: str) -> float:
        return float(h.score([prompt], [f" {obj}"])[0])

    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    assert p(req.prompt, "Paris") > p(req.prompt, "Rome")
    other_top = int(h.next_token_logprobs(["Berlin is the capital of"])[0].argmax())
    undo = rome(h, req, RomeConfig(stats_tokens=20_000)).apply(h.model)  # 20k: < 3 min cold
    assert p(req.prompt, "Rome") > p(req.prompt, "Paris")
    assert int(h.next_token_logprobs(["Berlin is the capital of"])[0].argmax()) == other_top
    assert p(other, "Paris") > p(other, "Rome")
    undo.revert(h.model)
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())


@pytest.mark.slow
def test_subject_location_with_sentencepiece():
    from lfm.assets import load_model

    tok = load_model("gemma3-270m").tokenizer
    text = "The Colosseum is located in"
    end = text.find("Colosseum") + len("Colosseum")
    ids, pos = subject_last_token(tok, text, end)
    s, e = tok(text, return_offsets_mapping=True)["offset_mapping"][pos]
    assert ids[0] == tok.bos_token_id and s < end <= e


@pytest.mark.slow
def test_rome_each_key_moves_a_subject_that_opens_the_prompt():
    """ "Times Square ..." starts the sequence (SmolLM2 adds no BOS): the bare prompt's key is far
    from the prefix mean, so r-ROME's mean-key update leaves New York ahead on the edit prompt
    itself, while one constraint per prefixed key moves it (same δ, same statistics)."""
    from lfm.assets import load_model
    from lfm.core.hooks import frozen
    from lfm.edit import common, edit_site
    from lfm.edit.patch import Delta, make_patch
    from lfm.edit.rome import rank_one, rome_defaults, rome_delta

    h = load_model("smollm2-135m")
    req = Request("Times Square is located in the city of", "Times Square", "Berlin")
    site = edit_site(h.model, None)
    cfg = rome_defaults(RomeConfig(stats_tokens=20_000), site)
    cov = common.covariance(h.model, h.tokenizer, site, cfg, None)
    with frozen(h.model):
        each, trace = rome_delta(h.model, h.tokenizer, req, cfg, site, cov)
    w = site.weight(h.model).detach().float()
    mean = Delta(each.module, *rank_one(w, trace.key, trace.value, cov, cfg.cov_ridge))

    def margin(delta: Delta) -> float:
        undo = make_patch(h.model, [delta], [req], "rome", cfg).apply(h.model)
        s = h.score([req.prompt] * 2, [" Berlin", " New York"])
        undo.revert(h.model)
        return float(s[0] - s[1])

    assert margin(mean) < 0 < margin(each)


@pytest.mark.slow
def test_fifty_grace_edits_in_a_row_hold_and_keep_unrelated_facts():
    """50 sequential GRACE edits on SmolLM2 (one codebook, each edit on top of the last): the
    edits hold and prompts of other relations keep their next token and their distribution bit
    for bit; removing the codebook restores the model."""
    from lfm.assets import load_model
    from lfm.edit import grace
    from lfm.edit.facts import load_facts

    h = load_model("smollm2-135m")
    facts = load_facts(name="lifelong", split="test")
    edited = [f for f in facts if f.relation == "city-country"][:50]
    others = [f.prompt for f in facts if f.relation == "country-capital"][:8]

    def wins(f) -> bool:
        s = h.score([f.prompt] * 2, [f" {f.new}", f" {f.true}"])
        return bool(s[0] > s[1])

    before = h.next_token_logprobs(others)
    unedited = sum(map(wins, edited))  # new objects the model already prefers (9 of 50)
    patch = None
    for f in edited:
        patch = grace(h, f.request, codebook=patch)
    undo = patch.apply(h.model)
    assert sum(map(wins, edited)) >= 48 > unedited + 20
    after = h.next_token_logprobs(others)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    assert torch.equal(after, before)  # outside every radius GRACE passes the layer through
    undo.revert(h.model)
    assert sum(map(wins, edited)) == unedited
