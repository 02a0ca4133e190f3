"""The split (prefix once, tail per step) δ search computes the same loss as full forward passes."""

from __future__ import annotations

import pytest
import torch

from lfm.core.hooks import frozen
from lfm.edit import RomeConfig, locate, tail
from lfm.edit.requests import Request, build_batch
from lfm.edit.site import edit_site

REQS = [
    Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome"),
    Request("Paris is the capital of", "Paris", "Italy"),  # subject first: empty KL prefix
]
CFG = RomeConfig(
    n_prefixes=4, v_steps=6, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.5, clamp_norm=1e3,
    stop_nll=0.0, layer=0,
)  # fmt: skip
# tiny random models have tiny MLP outputs: no ‖δ‖ penalty, so that the NLL visibly falls
SEARCH = CFG.replace(v_weight_decay=0.0, kl_factor=0.0625, v_lr=1.0, v_steps=10)


def _loss_fns(model, tok, req, layer):
    mod = edit_site(model, layer).projection(model)
    batch = build_batch(tok, req, locate.prefixes(CFG.n_prefixes))
    kl_batch = build_batch(tok, locate.essence_request(req), [""], with_target=False)
    kl_ref = locate._last_logp(model, kl_batch).detach()
    args = (model, mod, batch, kl_batch, kl_ref)
    return locate._full_losses(*args), locate._tail_losses(*args)


@pytest.mark.parametrize("req", REQS, ids=["mid", "first"])
@pytest.mark.parametrize("layer", [0, 1])
def test_tail_losses_and_gradients_match_full_forward(tiny_lm, req, layer):
    model, tok = tiny_lm
    full, fast = _loss_fns(model, tok, req, layer)
    torch.manual_seed(1)
    delta = (torch.randn(model.config.hidden_size) * 3).requires_grad_(True)
    got = [fn(delta) for fn in (full, fast)]
    for (nll_a, kl_a), (nll_b, kl_b) in [got]:
        # vacuous otherwise (δ in the last block cannot reach the KL prompt's last token)
        assert nll_a > 0 and (layer == 1 or kl_a > 1e-7)
        torch.testing.assert_close(nll_b, nll_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_b, kl_a, rtol=1e-3, atol=1e-6)
    grads = [torch.autograd.grad(nll + kl, delta)[0] for nll, kl in got]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_tail_search_reproduces_full_search(tiny_lm):
    model, tok = tiny_lm
    site = edit_site(model, 0)
    with frozen(model):
        runs = [
            locate.optimise_delta(model, tok, REQS[0], site, SEARCH.replace(tail_only=flag))
            for flag in (False, True)
        ]
    (d_full, t_full), (d_fast, t_fast) = runs
    assert d_full.norm() > 0 and t_full["nll_end"] < t_full["nll_start"]
    torch.testing.assert_close(d_fast, d_full, rtol=1e-4, atol=1e-5)
    assert t_fast["nll_end"] == pytest.approx(t_full["nll_end"], rel=1e-4)


def test_split_puts_the_subject_at_tail_column_zero(tiny_llama):
    model, tok = tiny_llama
    batch = build_batch(tok, REQS[0], locate.prefixes(3))
    p = batch.subject_pos
    s = tail.prepare(model, batch)
    assert torch.equal(s.input_ids[:, 0], batch.input_ids[torch.arange(len(p)), p])
    assert torch.equal(s.position_ids[:, 0], p)
    assert s.attention_mask.sum() == batch.attention_mask.sum()


def test_the_tail_pass_keeps_the_last_logits_by_default(tiny_llama):
    # `keep` defaults to the last position (mutant forward 1: the last two)
    model, tok = tiny_llama
    batch = build_batch(tok, Request("The city of the Eiffel Tower", "Eiffel Tower", "Rome"), [""])
    with torch.no_grad():
        t = tail.prepare(model, batch)
        assert tail.forward(model, t).shape[1] == 1
        assert tail.forward(model, t, 0).shape[1] == t.input_ids.shape[1]
