"""The real offline assets (installed by `make install`)."""

from __future__ import annotations

import pytest
import torch

from lfm.assets import describe, load_dataset, load_model
from lfm.assets.models import MODELS, gguf_cache_path

pytestmark = pytest.mark.slow


def test_smollm2_converts_once_then_loads_from_the_cache():
    h = load_model("smollm2-135m")
    folder = gguf_cache_path(MODELS["smollm2-135m"].locate())
    assert (folder / "lfm-source.json").exists() and (folder / "model.safetensors").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_model("smollm2-135m")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    prompt = "The Eiffel Tower is located in the city of"
    top = again.next_token_logprobs([prompt])[0].argmax().item()
    assert again.decode([top]).strip() == "Paris"
    info = describe(h)
    assert info["parameters"] == 134_515_008 and info["layout"]["num_layers"] == 30


def test_gemma3_loads_and_knows_a_fact():
    h = load_model("gemma3-270m")
    assert h.model.config.num_hidden_layers == 18 and h.vocab_size == 262_144
    scores = h.score(["The Eiffel Tower is located in the city of"] * 2, [" Paris", " London"])
    assert scores[0] > scores[1]


def test_minilm_and_mobilenet():
    enc = load_model("minilm-l6", kind="encoder")
    assert describe(enc)["config"]["hidden_size"] == 384
    net = load_model("mobilenet-v2")
    assert sum(p.numel() for p in net.model.parameters()) == 3_504_872
    assert net.scores(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_offline_datasets():
    fm = load_dataset("fashion-mnist")
    assert fm.x_train.shape == (60000, 1, 28, 28) and fm.x_test.shape == (10000, 1, 28, 28)
    assert fm.y_train.bincount().tolist() == [6000] * 10
    bbc = load_dataset("bbc-news")
    assert bbc.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert len(bbc.train_texts) + len(bbc.test_texts) == 2225
    assert len(bbc.test_texts) == 444 and set(bbc.y_test.tolist()) == set(range(5))
