"""The streaming engine on tiny Llama models saved in shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lfm.core import shards as S
from lfm.reuse import MissingTensorError, ShapeMismatchError, merge_models, merge_state_dicts
from lfm.reuse import engine as E

from conftest import make_lm


def _perturbed(seed: int):
    model, tok = make_lm("llama", seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model, tok


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2), ("c", 3)):
        model, tok = make_lm("llama", seed=0) if seed is None else _perturbed(seed)
        model.save_pretrained(root / name, max_shard_size="30KB")
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _disk_sd(path: Path) -> dict[str, torch.Tensor]:
    """A folder's tensors as the engine reads them (`read_tensor`, memory of their own): a dot
    product's last bits depend on where its inputs lie in memory (SLERP's cos Ω)."""
    files = sorted(path.glob("*.safetensors"))
    return {k: S.read_tensor(f, k) for f in files for k in load_file(f)}


@pytest.mark.parametrize(
    ("method", "cfg", "models", "base"),
    [
        ("ties", {"density": 0.3}, "abc", True),
        ("ties", {"density": 0.3, "trim_scope": "model"}, "abc", True),
        ("dare_ties", {"drop_rate": 0.5, "seed": 1}, "abc", True),
        ("model_stock", {}, "abc", True),
        ("slerp", {"t": 0.3}, "ab", False),
        ("linear", {}, "abc", False),
    ],
)
def test_streamed_merge_loads_and_equals_in_memory(zoo, tmp_path, method, cfg, models, base):
    paths = [zoo[m] for m in models]
    assert (zoo["a"] / E.INDEX).is_file()  # the inputs really are sharded
    out = merge_models(
        method, paths, tmp_path / "out", base=zoo["base"] if base else None, cfg=cfg,
        max_shard_size="40KB", progress=False,
    )  # fmt: skip
    assert (out / E.INDEX).is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert (out / "tokenizer.json").is_file()
    record = json.loads((out / "lfm_merge.json").read_text())
    assert record["method"] == method and record["config"] == {**record["config"], **cfg}
    expected = merge_state_dicts(
        method, _disk_sd(zoo["base"]) if base else None, [_disk_sd(p) for p in paths], cfg
    )
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert not torch.equal(
        expected["model.layers.0.mlp.up_proj.weight"],
        _disk_sd(paths[0])["model.layers.0.mlp.up_proj.weight"],
    )


def _single_file(tmp_path: Path, name: str, sd: dict) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_missing_tensor_is_an_error_naming_it(zoo, tmp_path):
    sd = _disk_sd(zoo["a"])
    del sd["model.layers.1.mlp.down_proj.weight"]
    broken = _single_file(tmp_path, "broken", sd)
    with pytest.raises(
        MissingTensorError, match=r"model\.layers\.1\.mlp\.down_proj\.weight missing from model 1"
    ):
        merge_models("ties", [zoo["b"], broken], tmp_path / "out", base=zoo["base"], progress=False)
    assert not (tmp_path / "out").exists()
    out = merge_models(
        "ties",
        [zoo["b"], broken],
        tmp_path / "out",
        base=zoo["base"],
        on_missing="skip",
        progress=False,
    )
    assert "model.layers.1.mlp.down_proj.weight" in _disk_sd(out)


def test_extra_tensor_is_an_error(zoo, tmp_path):
    sd = {**_disk_sd(zoo["a"]), "extra.weight": torch.zeros(2)}
    with pytest.raises(
        MissingTensorError, match=r"extra\.weight in model 0 but not in the template"
    ):
        merge_state_dicts("ties", _disk_sd(zoo["base"]), [sd])


def test_vocabulary_mismatch_is_an_error(zoo, tmp_path):
    sd = _disk_sd(zoo["a"])
    emb = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = torch.cat([emb, emb[:3]])
    with pytest.raises(
        ShapeMismatchError, match=r"vocabularies differ.*model\.embed_tokens\.weight"
    ):
        merge_models(
            "linear", [zoo["a"], _single_file(tmp_path, "big", sd)], tmp_path / "o", progress=False
        )


def test_tied_model_gives_its_input_embedding_as_output_embedding(zoo, tmp_path):
    untied = {
        **_disk_sd(zoo["base"]),
        "lm_head.weight": torch.randn(_disk_sd(zoo["base"])["model.embed_tokens.weight"].shape),
    }
    base_file = _single_file(tmp_path, "untied", untied)  # no config.json beside it: untied
    out = merge_models(
        "task_arithmetic", [zoo["a"]], tmp_path / "out", base=base_file, progress=False
    )
    merged = load_file(out / "model.safetensors")
    tau = _disk_sd(zoo["a"])["model.embed_tokens.weight"] - untied["lm_head.weight"]
    torch.testing.assert_close(merged["lm_head.weight"], untied["lm_head.weight"] + tau)


def test_failure_mid_merge_leaves_no_output(zoo, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_add = S.ShardWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        real_add(self, name, tensor)

    monkeypatch.setattr(S.ShardWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_models(
            "linear", [zoo["a"], zoo["b"]], tmp_path / "out", max_shard_size="20KB", progress=False
        )
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(zoo, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(E.MergeError, match="exists"):
        merge_models("linear", [zoo["a"]], tmp_path / "out", progress=False)


def test_parse_size():
    assert E.parse_size("2GB") == 2 * 10**9 and E.parse_size("64MiB") == 64 * 2**20
    assert E.parse_size(123) == 123
    with pytest.raises(E.MergeError):
        E.parse_size("lots")


def test_side_files_beside_the_weights_are_not_read_as_weights(tmp_path):
    """An edited folder (`lfm edit patch-apply`) keeps `edit-undo.safetensors` beside
    `model.safetensors`; only the model's files are weights (`lfm.core.io.model_files`)."""
    folders = []
    for name, seed in (("a", 1), ("b", 2)):
        model, tok = _perturbed(seed)
        model.save_pretrained(tmp_path / name)  # one model.safetensors
        tok.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    plain = merge_models("linear", folders, tmp_path / "plain", progress=False)
    save_file({"model.layers.0.mlp.down_proj": torch.zeros(3)},
              str(folders[0] / "edit-undo.safetensors"))  # fmt: skip
    sided = merge_models("linear", folders, tmp_path / "sided", progress=False)
    want, got = _disk_sd(plain), _disk_sd(sided)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert E.weight_files(folders[0]).keys() == load_file(folders[1] / "model.safetensors").keys()
