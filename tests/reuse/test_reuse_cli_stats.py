"""`lfm reuse stats` and `lfm reuse rebasin`, and the state-dict permutation spec."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lfm.cli.reuse import app
from lfm.core.runs import path_sha256
from lfm.errors import LfmError
from lfm.reuse.rebasin import apply_permutation, chain_spec, chain_spec_from_state_dict
from lfm.reuse.recipes import rebasin_files, statistics
from lfm.reuse.stats import FORMAT, stats_meta

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
                                   str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "c.safetensors"),
                                   "--root", str(tmp_path / "runs")])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "c.safetensors")
    assert all(torch.equal(got[k], sd[k]) for k in sd) and "2 layers aligned" in res.output
    (run,) = (tmp_path / "runs").iterdir()
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and m["outputs"] == [str(tmp_path / "c.safetensors")]
    assert m["inputs"]["b"]["sha256"] == path_sha256(tmp_path / "b.safetensors")
    assert m["config"]["config"] == {"max_iter": 100, "seed": 0}
    assert res.output.splitlines()[-1] == f"run: {run}"


def test_cli_stats_gram_of_a_gpt2_records_conv1d_orientation(tmp_path):
    model, tok = make_lm("gpt2")
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "t.txt").write_text("Paris is the capital of France.\n\nTokyo is a city.\n")
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["stats", "gram", str(tmp_path / "t.txt"), "--model", str(tmp_path / "lm"),
                                   "-o", str(tmp_path / "g.safetensors"), "--root", str(runs)])  # fmt: skip
    assert res.exit_code == 0, res.output
    (run,) = runs.iterdir()
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done" and m["outputs"] == [str(tmp_path / "g.safetensors")]
    assert {k: v["sha256"] for k, v in m["inputs"].items()} == {
        "model": path_sha256(tmp_path / "lm"), "texts": path_sha256(tmp_path / "t.txt")
    }  # fmt: skip
    meta = stats_meta(tmp_path / "g.safetensors", "gram")
    assert meta["format"] == FORMAT and meta["kind"] == "gram"
    assert (
        meta["count"] == 2 and meta["orientation"]["transformer.h.0.attn.c_attn.weight"] == "in_out"
    )
    g = load_file(tmp_path / "g.safetensors")["transformer.h.0.mlp.c_fc.weight"]
    assert g.shape == (32, 32) and torch.allclose(g, g.T, atol=1e-4)
    bad = CliRunner().invoke(
        app, ["stats", "hessian", str(tmp_path / "t.txt"), "--model", "x", "-o", "y"]
    )
    assert bad.exit_code == 2 and "fisher or gram" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    # the recipe from Python: a handle instead of a folder, the same file
    from lfm.access import LocalModel

    done = statistics("gram", LocalModel(model, tok), tmp_path / "t.txt",
                      tmp_path / "g2.safetensors", root=runs)  # fmt: skip
    again = load_file(tmp_path / "g2.safetensors")
    assert done.texts == 2 and torch.equal(again["transformer.h.0.mlp.c_fc.weight"], g)
    with pytest.raises(LfmError, match="needs \\(inputs, labels\\)"):
        statistics("fisher", LocalModel(model, tok), tmp_path / "t.txt", tmp_path / "f.safetensors",
                   fisher_kind="label", root=runs)  # fmt: skip
    (failed,) = runs.glob("*-stats-fisher")
    m = json.loads((failed / "manifest.json").read_text())
    assert m["status"].startswith("failed: ") and not (tmp_path / "f.safetensors").exists()
    with pytest.raises(LfmError, match="cannot read texts"):
        statistics(
            "gram", LocalModel(model, tok), tmp_path / "none.txt", tmp_path / "g3.safetensors"
        )


def test_stats_and_rebasin_user_errors_exit_2_in_one_line(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "junk.safetensors").write_text("junk")
    for args, want in [
        (["rebasin", str(tmp_path / "a.safetensors"), str(tmp_path / "junk.safetensors"), "-o", "c"], "cannot read"),
        (["rebasin", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "-o", "c"], "no chain"),
        (["rebasin", str(tmp_path / "a.safetensors"), str(tmp_path / "no.safetensors"), "-o", "c"], "no model at"),
        (["stats", "gram", str(tmp_path / "missing.txt"), "--model", "x", "-o", "y"], "cannot read texts"),
    ]:  # fmt: skip
        res = CliRunner().invoke(app, [*args, "--root", str(tmp_path / "runs")])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and want in lines[0], res.output


def test_rebasin_recipe_from_python_reports_what_moved(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = {"P0": torch.tensor([1, 0, 2, 3, 5, 4])}  # four units moved
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(apply_permutation(chain_spec(model), sd, perm), str(tmp_path / "b.safetensors"))
    done = rebasin_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.st",
                         root=tmp_path / "runs")  # fmt: skip
    assert (done.layers, done.moved) == (1, 4) and done.run.parent == tmp_path / "runs"
    got = load_file(tmp_path / "c.st")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
