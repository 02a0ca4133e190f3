"""PEFT's traps closed: target modules checked, empty adapters refused, adapters reload, generate works."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from lfm.errors import ConfigError, LfmError
from lfm.tuning.peft_methods import (
    ADAPTER_FILE,
    IA3Cfg,
    LoraCfg,
    PrefixTuningCfg,
    PromptTuningCfg,
    check_adapter_dir,
    inject,
    save_adapter,
)
from lfm.tuning.tiny import LABEL_IDS, tiny_batch
from lfm.tuning.trainer import TrainConfig, VerbalizerLM, apply_method, trainable_parameters, tune

from conftest import make_lm

TRAINABLE = ["full-ft", "bitfit", "lp-ft", "lora", "dora", "ia3", "prompt-tuning", "prefix-tuning"]


def test_wrong_target_is_named_even_when_another_matches():
    model, _ = make_lm("llama")
    with pytest.raises(ConfigError, match="'q_porj' match no module of LlamaForCausalLM"):
        inject(model, LoraCfg(target_modules=("q_proj", "q_porj")))
    with pytest.raises(ConfigError, match=r"'mlp\.up' match no module"):
        inject(
            make_lm("llama")[0],
            IA3Cfg(target_modules=("k_proj", "mlp.up"), feedforward_modules=("down_proj",)),
        )


def test_lora_parameter_count_is_r_times_in_plus_out_per_target():
    model, _ = make_lm("llama")  # d = 32, 4 heads of 8, 2 kv heads: q 32->32, v 32->16
    peft = inject(model, LoraCfg(r=4, target_modules=("q_proj", "v_proj")))
    per_layer = 4 * (32 + 32) + 4 * (32 + 16)
    assert trainable_parameters(peft) == 2 * per_layer


def test_gpt2_needs_its_own_names():
    model, _ = make_lm("gpt2")
    inject(model, LoraCfg())  # PEFT's default for GPT-2 is c_attn
    with pytest.raises(ConfigError, match="'q_proj'"):
        inject(make_lm("gpt2")[0], LoraCfg(target_modules=("q_proj",)))


def test_empty_adapter_is_refused(tmp_path):
    model, _ = make_lm("llama")
    with pytest.raises(LfmError, match="holds no PEFT adapter"):
        save_adapter(model, tmp_path / "a")
    (tmp_path / "b").mkdir()
    save_file({}, str(tmp_path / "b" / ADAPTER_FILE))
    with pytest.raises(LfmError, match="is empty"):
        check_adapter_dir(tmp_path / "b")
    with pytest.raises(LfmError, match="was not saved"):
        check_adapter_dir(tmp_path / "c")


@pytest.mark.parametrize("cfg", [LoraCfg(), IA3Cfg(), PromptTuningCfg(num_virtual_tokens=4), PrefixTuningCfg(num_virtual_tokens=4)],
                         ids=["lora", "ia3", "prompt", "prefix"])  # fmt: skip
def test_saved_adapter_reloads_with_peft_and_same_logits(tmp_path, cfg):
    model, _ = make_lm("llama")
    clf = VerbalizerLM(inject(model, cfg), LABEL_IDS)
    tune(clf, [tiny_batch(0)], cfg, TrainConfig(steps=3, lr=1e-2, progress=False, cpu=True))
    assert check_adapter_dir(save_adapter(clf.lm, tmp_path / "ad")) >= 1
    batch = tiny_batch(1)
    clf.eval()
    want = clf(batch["input_ids"], batch["attention_mask"])
    again = PeftModel.from_pretrained(make_lm("llama")[0], str(tmp_path / "ad")).eval()
    got = VerbalizerLM(again, LABEL_IDS)(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", TRAINABLE)
def test_generate_works_after_each_method(method):
    model, tok = make_lm("llama")
    cfg = {
        "prompt-tuning": {"num_virtual_tokens": 4},
        "prefix-tuning": {"num_virtual_tokens": 4},
    }.get(method)
    clf = VerbalizerLM(apply_method(model, method, cfg), LABEL_IDS)
    tune(
        clf,
        [tiny_batch(0)],
        clf_cfg(method, cfg),
        TrainConfig(steps=2, lr=1e-2, progress=False, cpu=True),
    )
    tok.padding_side = "left"
    enc = tok(["The Eiffel Tower is", "Paris"], return_tensors="pt", padding=True)
    out = clf.lm.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    assert all(isinstance(s, str) for s in tok.batch_decode(out[:, -5:]))


def clf_cfg(method, cfg):
    from lfm.tuning.trainer import method_config

    return method_config(method, cfg)
