"""Forward hooks by module name, freezing, and the inversion priors (`lfm.core`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.core.hooks import add_at, capture, frozen, hooked, replace_at, stop_after
from lfm.core.priors import bn_prior, total_variation
from lfm.errors import AccessError


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.calls: list[str] = []

    def forward(self, x):
        for name in ("a", "b", "c"):
            self.calls.append(name)
            x = getattr(self, name)(x)
        return x


def test_capture_reads_outputs_or_inputs_and_removes_its_hooks():
    m, x = Chain(), torch.randn(4, 3)
    with capture(m, ["a", "b"]) as outs:
        y = m(x)
    with capture(m, ["b"], inputs=True) as ins:
        m(x)
    assert torch.equal(outs["a"], m.a(x)) and torch.equal(ins["b"], outs["a"])
    assert torch.equal(y, m.c(outs["b"]))
    assert not outs["a"].requires_grad  # detached by default
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    with pytest.raises(AccessError, match="no module named d, e in Chain"), capture(m, ["d", "e"]):
        pass


def test_hooks_are_removed_when_the_pass_fails():
    m = Chain()
    with pytest.raises(RuntimeError), capture(m, ["a"]):
        m(torch.randn(4, 5))  # wrong width
    assert not m.a._forward_hooks


def test_stop_after_skips_the_layers_above():
    m = Chain()
    with stop_after(m, ["b"]) as run:
        assert run(lambda: m(torch.randn(2, 3))) is True
    assert m.calls == ["a", "b"]
    m.calls.clear()
    with stop_after(m, ["c"]) as run:  # the last module: nothing is skipped, yet it is stopped
        assert run(lambda: m(torch.randn(2, 3))) is True
    assert m.calls == ["a", "b", "c"]


def test_add_at_and_replace_at_change_only_the_given_positions():
    lin = nn.Linear(2, 2)
    x = torch.randn(3, 4, 2)
    base = lin(x)
    rows, pos = torch.tensor([0, 2]), torch.tensor([1, 3])
    with add_at(lin, rows, pos, torch.tensor([1.0, -1.0])):
        got = lin(x)
    want = base.clone()
    want[rows, pos] += torch.tensor([1.0, -1.0])
    assert torch.allclose(got, want)
    with replace_at(lin, rows, pos, torch.zeros(2, 2)):
        got = lin(x)
    assert torch.equal(got[rows, pos], torch.zeros(2, 2))
    assert torch.equal(got[1], base[1])
    assert torch.equal(lin(x), base)  # removed


def test_frozen_restores_flags_and_mode():
    m = Chain().train()
    m.b.weight.requires_grad_(False)
    with frozen(m, train=False) as f:
        assert f is m and not m.training
        assert not any(p.requires_grad for p in m.parameters())
    assert m.training
    assert [p.requires_grad for p in m.parameters()] == [True, True, False, True, True, True]
    with frozen(m):
        assert m.training  # None keeps the mode


def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 1.0]]]])  # (1, 1, 2, 2)
    # vertical differences 3, 0; horizontal 1, -2
    assert total_variation(x, p=1).item() == pytest.approx((3 + 0) / 2 + (1 + 2) / 2)
    assert total_variation(x, p=2).item() == pytest.approx((9 + 0) / 2 + (1 + 4) / 2)
    assert total_variation(torch.randn(4, 3)).item() == 0  # vectors have no neighbours


def test_bn_prior_by_hand():
    bn = nn.BatchNorm1d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    x = torch.tensor([[0.0, 2.0], [2.0, -2.0]])  # batch mean (1, 0), variance (1, 4)
    _, prior = bn_prior(nn.Sequential(bn), x)
    assert prior.item() == pytest.approx(0.0, abs=1e-6)
    x2 = x + torch.tensor([3.0, 0.0])  # mean moves by (3, 0): ‖Δμ‖ = 3
    _, prior = bn_prior(nn.Sequential(bn), x2)
    assert prior.item() == pytest.approx(3.0)


def test_capture_inputs_of_a_module_called_by_keyword():
    class Block(nn.Module):
        def forward(self, hidden_states=None):
            return hidden_states * 2

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(hidden_states=x)

    m, x = Outer(), torch.randn(2, 3)
    with capture(m, ["block"], inputs=True) as ins:
        m(x)
    assert torch.equal(ins["block"], x)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_replay_below_gives_the_full_pass_loss_and_gradient_without_running_the_blocks(kind):
    from lfm.core.hooks import replay_below
    from lfm.core.layouts import get_layout
    from lfm.edit import locate
    from lfm.edit.requests import Request, build_batch
    from lfm.edit.site import edit_site

    from conftest import deep_lm

    model, tok = deep_lm(kind, 4)
    site = edit_site(model, 2)
    batch = build_batch(tok, Request("The tower is in", "tower", "Rome"), ["", "So."])
    tau = torch.randn(site.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    tau.requires_grad_(True)

    def side(_m, args, out):  # a change at block 2's MLP output, as an edit makes
        return out + torch.nn.functional.linear(args[0], tau)

    def loss_and_grad():
        tau.grad = None
        with hooked([(site.projection(model), side)]):
            nll = locate._target_nll(model, batch)
        nll.backward()
        return nll.detach(), tau.grad.clone()

    want = loss_and_grad()
    blocks = model.get_submodule(get_layout(model).layers)
    originals = list(blocks)
    with replay_below(model, site.block, lambda: locate._target_nll(model, batch)):
        ran = []
        with hooked([(originals[i], lambda *a, i=i: ran.append(i)) for i in range(4)]):
            got = loss_and_grad()
        assert ran == [2, 3]  # blocks 0 and 1 were replayed, not run
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    assert list(blocks) == originals  # the blocks are back
    with (
        pytest.raises(AccessError, match="not one of a list of blocks"),
        replay_below(model, site.module, lambda: None),
    ):
        pass
