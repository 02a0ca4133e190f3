"""`lfm edit patch-apply --stream`: a patch applied to a model folder one tensor at a time, the
model never loaded; the same folder as the loaded path writes, bit for bit, and refusals before
anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lfm.assets import load_model
from lfm.cli.edit import app
from lfm.core.io import model_files
from lfm.edit import common, recipes
from lfm.edit.patch import UNDO_FILE, Delta, load_originals, make_patch
from lfm.errors import LfmError

# a low-rank delta on an MLP output (llama: Linear, gpt2: Conv1D, stored (in, out)) and a dense
# one on a non-square module, where a wrong orientation cannot pass unnoticed
MODULES = {
    "llama": ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"),
    "gpt2": ("transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"),
}


def _folder(path, kind, **save):
    lm = common.smoke_model(kind, 0)
    lm.model.save_pretrained(path, **save)
    lm.tokenizer.save_pretrained(path)
    return path


def _patch(folder, kind, path, dtype=None, seed=1):
    model = load_model(str(folder), dtype=dtype).model
    low, dense = MODULES[kind]
    gen = torch.Generator().manual_seed(seed)
    n_out, n_in = _linear_shape(model, kind, low)
    deltas = [
        Delta(low, u=torch.randn(n_out, 1, generator=gen), v=torch.randn(n_in, 1, generator=gen)),
        Delta(dense, dense=torch.randn(_linear_shape(model, kind, dense), generator=gen) * 0.05),
    ]
    make_patch(model, deltas, [common.SMOKE_REQUEST], "test", {}).save(path)
    return path


def _linear_shape(model, kind, name):
    """(out, in) of a module's weight: GPT-2's Conv1D stores (in, out)."""
    shape = tuple(model.get_submodule(name).weight.shape)
    return shape[::-1] if kind == "gpt2" else shape


def _weights(folder):
    return {k: v for f in model_files(folder) for k, v in load_file(f).items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streamed_folder_equals_the_loaded_paths_bit_for_bit(kind, tmp_path):
    folder = _folder(tmp_path / "m", kind)
    patch = _patch(folder, kind, tmp_path / "p.safetensors")
    loaded = recipes.patch_apply(str(folder), patch, tmp_path / "loaded")
    streamed = recipes.patch_apply(str(folder), patch, tmp_path / "streamed", stream=True)
    a, b, base = _weights(loaded), _weights(streamed), _weights(folder)
    assert set(a) == set(b) == set(base)
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed == {f"{m}.weight" for m in MODULES[kind]}  # the patch did change them
    undo_a, undo_b = load_originals(loaded / UNDO_FILE), load_originals(streamed / UNDO_FILE)
    assert set(undo_b) == set(MODULES[kind])
    assert all(torch.equal(undo_a[k], undo_b[k]) for k in undo_a)
    # the streamed folder loads, generates the loaded one's logits, and reverts bit for bit
    ids = torch.tensor([[1, 5, 9, 2]])
    la, lb = (load_model(str(p)).model(ids).logits for p in (loaded, streamed))
    assert torch.equal(la, lb)
    back = recipes.patch_revert(streamed, tmp_path / "back", root=None)
    assert all(torch.equal(v, base[k]) for k, v in _weights(back).items())
    assert {f.name for f in folder.iterdir()} <= {f.name for f in streamed.iterdir()}


def test_stream_never_loads_the_model(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "m", "llama")
    patch = _patch(folder, "llama", tmp_path / "p.safetensors")
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    out = recipes.patch_apply(str(folder), patch, tmp_path / "e", stream=True)
    assert (out / UNDO_FILE).is_file()


def test_stream_keeps_shards_and_a_prefixless_checkpoint(tmp_path):
    """A sharded folder, and a GPT-2 folder whose names lack `transformer.` (as the original
    checkpoints store them): the patch finds its tensors either way."""
    folder = _folder(tmp_path / "m", "gpt2", max_shard_size="20KB")
    assert len(model_files(folder)) > 1
    patch = _patch(folder, "gpt2", tmp_path / "p.safetensors")
    loaded = _weights(recipes.patch_apply(str(folder), patch, tmp_path / "loaded"))
    for f in model_files(folder):  # the same folder, names without the base model's prefix
        save_file({k.removeprefix("transformer."): v for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})  # fmt: skip
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k.removeprefix("transformer."): v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    streamed = _weights(recipes.patch_apply(str(folder), patch, tmp_path / "s", stream=True))
    assert {k.removeprefix("transformer.") for k in loaded} == set(streamed)
    assert all(torch.equal(v, streamed[k.removeprefix("transformer.")]) for k, v in loaded.items())


def test_cli_stream_in_bfloat16_writes_bfloat16_and_says_so(tmp_path):
    folder = _folder(tmp_path / "m", "llama")
    patch = _patch(folder, "llama", tmp_path / "p.safetensors", dtype="bfloat16")
    outs = {}
    for name, extra in (("loaded", []), ("streamed", ["--stream"])):
        args = ["patch-apply", str(patch), "--model", str(folder), "-o", str(tmp_path / name),
                "--dtype", "bfloat16", "--root", str(tmp_path / "runs"), *extra]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        outs[name] = _weights(tmp_path / name)
    assert {v.dtype for v in outs["streamed"].values()} == {torch.bfloat16}
    assert all(torch.equal(v, outs["streamed"][k]) for k, v in outs["loaded"].items())
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert "bfloat16" in {config.get("dtype"), config.get("torch_dtype")}
    # a float32 patch does not fit the bfloat16 weights: refused, as without --stream
    p32 = _patch(folder, "llama", tmp_path / "p32.safetensors")
    args = ["patch-apply", str(p32), "--model", str(folder), "-o", str(tmp_path / "x"),
            "--dtype", "bfloat16", "--stream", "--root", str(tmp_path / "runs")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "made for other weights" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()


def test_refusals_write_nothing(tmp_path):
    folder = _folder(tmp_path / "m", "llama")
    other = _folder(tmp_path / "o", "gpt2")
    patch = _patch(folder, "llama", tmp_path / "p.safetensors")
    with pytest.raises(LfmError, match=r"edits model\.layers\.0\.mlp\.down_proj, which this model"):
        recipes.patch_apply(str(other), patch, tmp_path / "a", stream=True)
    assert not (tmp_path / "a").exists()
    damaged = tmp_path / "d"
    _folder(damaged, "llama")
    (f,) = model_files(damaged)
    ts = load_file(f)
    ts["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(ts, f, metadata={"format": "pt"})
    with pytest.raises(LfmError, match=r"q_proj.weight holds NaN or infinity"):
        recipes.patch_apply(str(damaged), patch, tmp_path / "b", stream=True)
    assert not (tmp_path / "b").exists()
    with pytest.raises(LfmError, match="give its name or folder, not a handle"):
        recipes.patch_apply(load_model(str(folder)), patch, tmp_path / "c", stream=True)
    empty = tmp_path / "bin"
    empty.mkdir()
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(LfmError, match="holds no safetensors weights"):
        recipes.patch_apply(str(empty), patch, tmp_path / "e", stream=True)
