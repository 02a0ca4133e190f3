"""GGUF files as merge inputs: tensors named as transformers names them and dequantised one at a
time (bit for bit what transformers' own GGUF loading gives); a bad file is one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lfm.reuse.driver import MergeError
from lfm.reuse.plan import PlanError, check_plan


def test_a_file_that_is_not_gguf_is_one_line_before_anything_is_merged(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"GGUF but not really")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"method": "linear", "models": ["fake.gguf", "a.safetensors"]}))
    with pytest.raises(PlanError) as info:
        check_plan(plan)
    (line,) = info.value.problems
    assert "fake.gguf as a GGUF model" in line and "\n" not in line
    (tmp_path / "notes.txt").write_text("x")  # another suffix is still not a model
    plan.write_text(yaml.safe_dump({"method": "linear", "models": ["notes.txt", "a.safetensors"]}))
    with pytest.raises(MergeError, match=r"a \.safetensors or a \.gguf file"):
        check_plan(plan)


@pytest.mark.slow
def test_smollm2_gguf_reads_and_merges_as_its_dequantised_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lfm.assets.models import MODELS, convert_gguf
    from lfm.reuse.engine import SafetensorsReader
    from lfm.reuse.gguf import GgufReader
    from lfm.reuse.recipes import merge_plan

    gguf = MODELS["smollm2-135m"].locate()
    folder = convert_gguf(gguf)  # transformers' own dequantisation, cached
    got, ref = GgufReader(gguf), SafetensorsReader(folder)
    assert sorted(got.keys()) == sorted(ref.keys()) and got.tied and ref.tied
    assert all(got.shape(k) == ref.shape(k) for k in ref.keys())  # noqa: SIM118 (a reader)
    # query and key rows are put back in Hugging Face's order (llama.cpp permutes them)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.embed_tokens.weight", "model.norm.weight"):  # fmt: skip
        assert torch.equal(got.get(k), ref.get(k)), k
    # the GGUF as the template of a merge with its conversion: the mean of equal weights
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"method": "linear", "models": [str(gguf), str(folder)]}))
    out = merge_plan(plan, tmp_path / "merged", progress=False, root=tmp_path / "runs")[1]
    merged = load_file(str(out / "model.safetensors"))
    want = load_file(str(folder / "model.safetensors"))
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    config = json.loads((out / "config.json").read_text())  # from the GGUF's metadata
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    top = model(ids).logits[0, -1].argmax()
    assert tok.decode(top).strip() == "Paris"
