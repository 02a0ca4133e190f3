"""`lfm reuse stats` and `lfm reuse rebasin`, and the state-dict permutation spec."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lfm.cli.reuse import app
from lfm.reuse.rebasin import apply_permutation, chain_spec, chain_spec_from_state_dict
from lfm.reuse.stats import stats_meta

from conftest import TinyCNN, make_lm


def test_spec_from_state_dict_equals_module_spec():
    torch.manual_seed(0)
    for model in (TinyCNN(), nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))):
        assert chain_spec_from_state_dict(model.state_dict()) == chain_spec(model)


def test_cli_rebasin_aligns_a_permuted_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spec = chain_spec(model)
    perms = {"P0": torch.randperm(9), "P1": torch.randperm(7)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(apply_permutation(spec, sd, perms), str(tmp_path / "b.safetensors"))
    res = CliRunner().invoke(app, ["rebasin", str(tmp_path / "a.safetensors"),
                                   str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "c.safetensors")])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "c.safetensors")
    assert all(torch.equal(got[k], sd[k]) for k in sd) and "2 layers aligned" in res.output


def test_cli_stats_gram_of_a_gpt2_records_conv1d_orientation(tmp_path):
    model, tok = make_lm("gpt2")
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "t.txt").write_text("Paris is the capital of France.\n\nTokyo is a city.\n")
    res = CliRunner().invoke(app, ["stats", "gram", str(tmp_path / "lm"), str(tmp_path / "t.txt"),
                                   "-o", str(tmp_path / "g.safetensors")])  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = stats_meta(tmp_path / "g.safetensors")
    assert (
        meta["count"] == 2 and meta["orientation"]["transformer.h.0.attn.c_attn.weight"] == "in_out"
    )
    g = load_file(tmp_path / "g.safetensors")["transformer.h.0.mlp.c_fc.weight"]
    assert g.shape == (32, 32) and torch.allclose(g, g.T, atol=1e-4)
    bad = CliRunner().invoke(app, ["stats", "hessian", "x", str(tmp_path / "t.txt"), "-o", "y"])
    assert bad.exit_code == 1 and "fisher or gram" in bad.output
