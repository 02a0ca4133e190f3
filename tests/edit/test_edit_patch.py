"""Patches: apply / revert bit for bit, save / load, refusal on other weights, Conv1D."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lfm.core.io import read_meta, save_tensors
from lfm.edit.patch import FORMAT, Delta, Patch, linear_weight, make_patch
from lfm.edit.requests import Request
from lfm.errors import LfmError

from conftest import make_lm

REQ = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")


def _patch(model, name: str) -> Patch:
    w = linear_weight(model, name)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(w.shape[1], 2, generator=g)
    return make_patch(model, [Delta(name, u, v)], [REQ], "test", {"k": 1})


def test_apply_then_revert_is_bit_exact():
    model, _ = make_lm("llama")
    name = "model.layers.0.mlp.down_proj"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = _patch(model, name)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not mutated
    undo = patch.apply(model)
    assert not torch.equal(before[f"{name}.weight"], model.get_submodule(name).weight)
    undo.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_load_round_trip(tmp_path):
    model, _ = make_lm("llama")
    patch = _patch(model, "model.layers.1.mlp.down_proj")
    path = patch.save(tmp_path / "p.safetensors")
    loaded = Patch.load(path)
    assert loaded.base == patch.base and loaded.requests == [REQ] and loaded.config == {"k": 1}
    assert torch.equal(loaded.deltas[0].matrix(), patch.deltas[0].matrix())
    assert read_meta(path, FORMAT)["modules"] == ["model.layers.1.mlp.down_proj"]


def test_a_patch_written_before_lfm_core_io_still_loads(tmp_path):
    """Files written by earlier versions (metadata strings written by hand) load unchanged."""
    model, _ = make_lm("llama")
    patch = _patch(model, "model.layers.1.mlp.down_proj")
    meta = {"format": FORMAT, "method": "ft-l", "base": patch.base, "config": '{"k": 1}',
            "requests": json.dumps([REQ.to_dict()]), "modules": json.dumps(patch.modules),
            "info": json.dumps(patch.info)}  # fmt: skip
    tensors = {k: v.contiguous() for d in patch.deltas for k, v in d.tensors().items()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = Patch.load(tmp_path / "old.safetensors")
    assert (loaded.method, loaded.base, loaded.config) == ("ft-l", patch.base, {"k": 1})
    assert loaded.requests == [REQ] and loaded.info == patch.info
    assert torch.equal(loaded.deltas[0].matrix(), patch.deltas[0].matrix())


def test_refused_on_other_weights_and_garbage(tmp_path):
    model, _ = make_lm("llama")
    other, _ = make_lm("llama", seed=1)
    patch = _patch(model, "model.layers.0.mlp.down_proj")
    before = other.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(LfmError, match="made for other weights"):
        patch.apply(other)
    assert torch.equal(before, other.model.layers[0].mlp.down_proj.weight)
    gpt2, _ = make_lm("gpt2")
    with pytest.raises(LfmError, match="lacks"):
        patch.apply(gpt2)
    (tmp_path / "x.safetensors").write_bytes(b"not a patch")
    with pytest.raises(LfmError, match=r"cannot read .*x\.safetensors"):
        Patch.load(tmp_path / "x.safetensors")
    save_tensors(tmp_path / "s.safetensors", {"keys.0": torch.zeros(2, 1)}, "lfm-alphaedit-state/1")
    with pytest.raises(LfmError, match="not a lfm-edit-patch/1 file"):
        Patch.load(tmp_path / "s.safetensors")


def test_gpt2_conv1d_is_transposed_by_type():
    model, _ = make_lm("gpt2")
    name = "transformer.h.0.mlp.c_proj"  # Conv1D weight (in=128, out=32)
    mod = model.get_submodule(name)
    assert mod.weight.shape == (128, 32) and linear_weight(model, name).shape == (32, 128)
    patch = _patch(model, name)
    x = torch.randn(3, 128)
    y0 = mod(x)
    undo = patch.apply(model)
    assert torch.allclose(mod(x) - y0, x @ patch.deltas[0].matrix().T, atol=1e-5)
    undo.revert(model)
