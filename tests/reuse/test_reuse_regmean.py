"""RegMean: the closed form against least squares on the joint data, and statistics from models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.errors import LfmError
from lfm.reuse import merge_state_dicts
from lfm.reuse.datamerge import regmean
from lfm.reuse.stats import gram, linear_layers, save_gram, stats_meta


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(20, 5, generator=gen), torch.randn(30, 5, generator=gen) * 2]
    ws = [torch.randn(3, 5, generator=gen) for _ in range(2)]
    return xs, ws


def test_regmean_is_the_joint_least_squares_solution():
    xs, ws = _problem()
    grams = [{"fc.weight": x.T @ x} for x in xs]
    sds = [{"fc.weight": w, "fc.bias": torch.full((3,), float(i))} for i, w in enumerate(ws)]
    out = merge_state_dicts("regmean", None, sds, {"alpha": 1.0}, stats={"per_model": grams})
    x_all = torch.cat(xs).double()
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)]).double()
    want = torch.linalg.lstsq(x_all, y_all).solution.T  # argmin ‖X Wᵀ − Y‖²
    torch.testing.assert_close(out["fc.weight"].double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["fc.bias"], torch.full((3,), 0.5))  # other tensors averaged


def test_regmean_alpha_shrinks_off_diagonals_and_zero_alpha_is_diagonal_weighting():
    xs, ws = _problem(1)
    grams = [x.T @ x for x in xs]
    got = regmean(ws, grams, [1.0, 1.0], alpha=0.0, in_out=False)
    d = [torch.diag(g) for g in grams]  # diagonal Gram: a per-input-feature weighted average
    want = (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(regmean(ws, grams, [1.0, 1.0], 0.9, False), got)


def test_regmean_on_identical_models_returns_the_model():
    xs, ws = _problem(2)
    sd = {"fc.weight": ws[0], "fc.bias": torch.ones(3)}
    grams = [{"fc.weight": x.T @ x} for x in xs]
    out = merge_state_dicts("regmean", None, [sd, sd], stats={"per_model": grams})
    torch.testing.assert_close(out["fc.weight"], ws[0], atol=1e-4, rtol=1e-4)


def test_gram_statistics_of_linear_and_conv1d_layers(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Conv1D(3, 6))
    assert linear_layers(model) == {"0": "out_in", "2": "in_out"}
    x = torch.randn(10, 4)
    grams, orient, n = gram(model, [x[:4], x[4:]])
    torch.testing.assert_close(grams["0.weight"], x.T @ x)
    h = torch.relu(model[0](x))
    torch.testing.assert_close(grams["2.weight"], h.T @ h, atol=1e-5, rtol=1e-5)
    assert n == 10 and orient["2.weight"] == "in_out"
    with pytest.raises(LfmError, match="not linear or conv layers of Sequential: 1"):
        gram(model, [x], modules=["1"])  # the ReLU
    path = save_gram(tmp_path / "g.safetensors", model, [x])
    assert stats_meta(path)["orientation"] == {"0.weight": "out_in", "2.weight": "in_out"}


def test_regmean_in_out_orientation_is_the_transpose():
    xs, ws = _problem(3)
    grams = [x.T @ x for x in xs]
    a = regmean(ws, grams, [1.0, 1.0], 0.9, in_out=False)
    b = regmean([w.T for w in ws], grams, [1.0, 1.0], 0.9, in_out=True)
    torch.testing.assert_close(a, b.T)
    sds = [{"c.weight": w.T.contiguous()} for w in ws]  # a Conv1D stores W as (in, out)
    stats = {"per_model": [{"c.weight": g} for g in grams], "orientation": {"c.weight": "in_out"}}
    out = merge_state_dicts("regmean", None, sds, stats=stats)
    torch.testing.assert_close(out["c.weight"], a.T)
