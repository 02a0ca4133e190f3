"""RegMean on conv layers: patch Grams, and the merge as the joint least-squares solution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfm.reuse import MergeError, merge_state_dicts
from lfm.reuse.datamerge import regmean_conv
from lfm.reuse.stats import conv_gram, gram, linear_layers, save_gram, stats_meta


def _conv(cin: int, cout: int, groups: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False).double()


@pytest.mark.parametrize(
    ("cin", "cout", "groups", "stride"), [(3, 4, 1, 1), (4, 4, 4, 2), (4, 6, 2, 1)]
)
def test_conv_gram_gives_each_output_channels_energy(cin, cout, groups, stride):
    # Σ_positions y_o² = w_o G_g w_oᵀ holds only if the patches are ordered like the weight.
    torch.manual_seed(0)
    conv, x = _conv(cin, cout, groups, stride), torch.randn(5, cin, 7, 7, dtype=torch.float64)
    g = conv_gram(conv, x)
    d = cin // groups * 9
    assert g.shape == (groups, d, d)
    y = conv(x).detach()
    w = conv.weight.detach().reshape(cout, d)
    group_of = torch.arange(cout) // (cout // groups)
    energy = torch.einsum("od,ode,oe->o", w, g[group_of], w)
    torch.testing.assert_close(energy, (y**2).sum((0, 2, 3)))


def _objective(weight, xs, ws, groups):
    return sum(((F.conv2d(x, weight, padding=1, groups=groups) - F.conv2d(x, w, padding=1, groups=groups)) ** 2).sum()
               for x, w in zip(xs, ws, strict=True))  # fmt: skip


@pytest.mark.parametrize("groups", [1, 3])
def test_regmean_conv_minimises_the_summed_output_error(groups):
    gen = torch.Generator().manual_seed(1)
    conv = _conv(3, 6, groups)
    xs = [torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64) * s for s in (1.0, 3.0)]
    ws = [torch.randn(6, 3 // groups, 3, 3, generator=gen, dtype=torch.float64) for _ in xs]
    grams = [conv_gram(conv, x) for x in xs]
    merged = regmean_conv(ws, grams, [1.0, 1.0], alpha=1.0).double().requires_grad_()
    (grad,) = torch.autograd.grad(_objective(merged, xs, ws, groups), merged)
    avg = ((ws[0] + ws[1]) / 2).requires_grad_()
    (grad_avg,) = torch.autograd.grad(_objective(avg, xs, ws, groups), avg)
    assert grad.norm() < 1e-4 * grad_avg.norm()  # a stationary point of the convex objective
    assert _objective(merged, xs, ws, groups) < _objective(avg, xs, ws, groups)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).eval()  # fmt: skip


def test_regmean_merges_conv_nets_through_gram_files(tmp_path):
    torch.manual_seed(2)
    nets, xs = [_net(), _net()], [torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8) + 1]
    assert linear_layers(nets[0]) == {"0": "conv", "3": "conv", "5": "conv", "8": "out_in"}
    paths = [str(save_gram(tmp_path / f"g{k}.safetensors", n, [x])) for k, (n, x) in enumerate(zip(nets, xs, strict=True))]  # fmt: skip
    assert stats_meta(paths[0])["orientation"]["3.weight"] == "conv"
    sds = [n.state_dict() for n in nets]
    out = merge_state_dicts("regmean", None, sds, {"stats": paths, "alpha": 0.9})
    grams = [gram(n, [x])[0] for n, x in zip(nets, xs, strict=True)]
    assert grams[0]["3.weight"].shape == (8, 9, 9)  # depthwise: one 9 x 9 Gram per channel
    for name in ("0.weight", "3.weight", "5.weight"):
        want = regmean_conv([sd[name] for sd in sds], [g[name] for g in grams], [1.0, 1.0], 0.9)
        torch.testing.assert_close(out[name], want)
        assert not torch.allclose(out[name], (sds[0][name] + sds[1][name]) / 2, atol=1e-4)
    torch.testing.assert_close(out["3.bias"], (sds[0]["3.bias"] + sds[1]["3.bias"]) / 2)
    same = merge_state_dicts("regmean", None, [sds[0], sds[0]], {"stats": paths})
    torch.testing.assert_close(same["3.weight"], sds[0]["3.weight"], atol=1e-5, rtol=1e-5)


def test_regmean_conv_rejects_a_gram_of_another_layer():
    w = [torch.randn(4, 2, 3, 3)] * 2
    with pytest.raises(MergeError, match="does not fit a conv"):
        regmean_conv(w, [torch.eye(9)[None].repeat(2, 1, 1)] * 2, [1.0, 1.0], 0.9)
