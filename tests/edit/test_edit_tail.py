"""The split (prefix once, tail per step) δ search computes the same loss as full forward passes."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from lfm.core.hooks import frozen
from lfm.edit import RomeConfig, locate, tail
from lfm.edit.requests import Batch, Request, build_batch
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


def _hand_batch():
    """Three right-padded rows (0 pads): subjects at 2, 0 and 1; lengths 4, 3 and 5."""
    ids = torch.tensor([[11, 12, 13, 14, 0], [21, 22, 23, 0, 0], [31, 32, 33, 34, 35]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    p = torch.tensor([2, 0, 1])
    return Batch(ids, mask, p, [[3], [1, 2], [4]], [[7], [8, 9], [6]])


def test_split_left_pads_the_prefixes_and_right_pads_the_tails():
    batch = _hand_batch()
    pre, tl = tail.split(batch, batch.subject_pos, 4)
    assert pre.dtype == tl.dtype == torch.long
    assert torch.equal(pre, torch.tensor([[11, 12], [0, 0], [0, 31]]))
    assert torch.equal(tl, torch.tensor([[13, 14, 0, 0], [21, 22, 23, 0], [32, 33, 34, 35]]))


def test_the_masks_hide_the_padding_and_the_positions_are_the_unsplit_rows():
    batch = _hand_batch()
    pre_mask, mask, pos = tail._masks(batch, 2, 4)
    assert torch.equal(pre_mask, torch.tensor([[1, 1], [0, 0], [0, 1]]))
    want = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    assert torch.equal(mask, want) and mask.dtype == torch.long
    assert torch.equal(pos, torch.tensor([[2, 3, 4, 5], [0, 1, 2, 3], [1, 2, 3, 4]]))


class _Spy(torch.nn.Module):
    """Records the prefix pass's arguments; returns a cache marker."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.calls: list[dict] = []

    def forward(self, **kw):
        self.calls.append(kw)
        return SimpleNamespace(cache="prefix cache", logits=None)


def test_prepare_runs_the_prefix_once_with_its_positions_and_shifts_the_targets():
    spy = _Spy()
    batch = _hand_batch()
    t = tail.prepare(spy, batch)
    (call,) = spy.calls
    assert torch.equal(call["input_ids"], torch.tensor([[11, 12], [0, 0], [0, 31]]))
    assert torch.equal(call["attention_mask"], torch.tensor([[1, 1], [0, 0], [0, 1]]))
    assert torch.equal(call["position_ids"], torch.tensor([[0, 1], [0, 0], [0, 0]]))
    assert call["use_cache"] is True and call["logits_to_keep"] == 1
    assert t.cache == "prefix cache" and t.input_ids.shape == (3, 4)
    assert t.target_pos == [[1], [1, 2], [3]] and t.target_ids == batch.target_ids
    assert torch.equal(t.position_ids, torch.tensor([[2, 3, 4, 5], [0, 1, 2, 3], [1, 2, 3, 4]]))
    # every subject first: no prefix, no pass
    first = replace(batch, subject_pos=torch.tensor([0, 0, 0]), target_pos=[[0], [0], [0]])
    spy.calls.clear()
    t0 = tail.prepare(spy, first)
    assert spy.calls == [] and t0.cache is None and t0.input_ids.shape == (3, 5)
    assert torch.equal(t0.attention_mask, batch.attention_mask)


def test_the_prefix_and_tail_passes_feed_the_models_device():
    spy = _Spy("meta")  # the meta device stands for an accelerator: where the inputs went
    tail.forward(spy, tail.prepare(spy, _hand_batch()))
    assert len(spy.calls) == 2  # the prefix, then the tail
    for call in spy.calls:
        where = {k: v.device.type for k, v in call.items() if isinstance(v, torch.Tensor)}
        assert where == dict.fromkeys(("input_ids", "attention_mask", "position_ids"), "meta")
