"""LoRA adapters (PEFT format) as merge inputs: task arithmetic with λ = 1 on one adapter equals
PEFT's own `merge_and_unload()`; two adapters merge with TIES like any two models."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lfm.reuse import merge_models
from lfm.reuse.driver import MergeError
from lfm.reuse.plan import load_plan

from conftest import make_lm

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def _adapter(kind: str, folder, seed: int, r: int = 4, alpha: int = 8, **kw):
    """Save a randomly initialised LoRA adapter (B ≠ 0) and return the model it makes, merged."""
    model, _ = make_lm(kind)
    cfg = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS[kind], init_lora_weights=False,
        fan_in_fan_out=kind == "gpt2", **kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(folder)
    return pm.merge_and_unload().state_dict()


@pytest.fixture(params=["llama", "gpt2"])
def setup(request, tmp_path):
    kind = request.param
    model, tok = make_lm(kind)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return kind, tmp_path, model.state_dict()


def test_task_arithmetic_of_one_adapter_equals_merge_and_unload(setup):
    kind, root, base_sd = setup
    want = _adapter(kind, root / "lora", seed=1)
    out = merge_models(
        "task_arithmetic", [root / "lora"], root / "m", base=root / "base", progress=False
    )
    got = load_file(out / "model.safetensors")
    changed = [k for k in got if not torch.equal(got[k], base_sd[k])]
    assert changed, "the adapter changed nothing"
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_rslora_and_alpha_pattern(setup, tmp_path):
    kind, root, _ = setup
    key = TARGETS[kind][0]
    want = _adapter(kind, root / "lora", seed=2, use_rslora=True, alpha_pattern={key: 3})
    out = merge_models(
        "task_arithmetic", [root / "lora"], root / "m", base=root / "base", progress=False
    )
    got = load_file(out / "model.safetensors")
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ties_over_two_adapters_from_a_mergekit_plan(setup):
    kind, root, base_sd = setup
    a = _adapter(kind, root / "la", seed=3)
    b = _adapter(kind, root / "lb", seed=4)
    plan = {
        "merge_method": "ties", "base_model": str(root / "base"),
        "models": [{"model": str(root / "la"), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": f"{root / 'base'}+{root / 'lb'}", "parameters": {"weight": 1.0, "density": 0.5}}],
    }  # fmt: skip
    (root / "p.yml").write_text(yaml.safe_dump(plan))
    out = load_plan(root / "p.yml").run(root / "m", progress=False)
    got = load_file(out / "model.safetensors")
    from lfm.reuse import merge_state_dicts

    want = merge_state_dicts("ties", base_sd, [a, b], {"density": 0.5})
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_adapter_without_a_base_is_refused(tmp_path):
    _adapter("llama", tmp_path / "lora", seed=0)
    with pytest.raises(MergeError, match="base model"):
        merge_models("linear", [tmp_path / "lora"], tmp_path / "m", progress=False)
