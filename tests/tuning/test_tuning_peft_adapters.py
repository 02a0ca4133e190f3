"""PEFT's traps closed: target modules checked, empty adapters refused, adapters reload, generate
works; the adapter built follows from the method's name, never from the config's class."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from lfm.core.train import TrainConfig
from lfm.errors import ConfigError, LfmError
from lfm.registry import run
from lfm.tuning.adapters import ADAPTER_FILE, check_adapter_dir, save_adapter
from lfm.tuning.classify import VerbalizerLM
from lfm.tuning.peft_methods import (
    DoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    adapter,
    lora,
)
from lfm.tuning.tiny import tiny_news_lm, tiny_task
from lfm.tuning.trainer import trainable_parameters

from conftest import make_lm

TRAINABLE = ["full_ft", "bitfit", "lp_ft", "wise_ft", "lora", "dora", "ia3", "prompt_tuning",
             "prefix_tuning", "mezo"]  # fmt: skip
SMALL = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
         "mezo": {"steps": 2, "lr": 1e-3}}  # fmt: skip


def _tcfg(steps: int = 2, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, progress=False, cpu=True)


def test_wrong_target_is_named_even_when_another_matches():
    model, _ = make_lm("llama")
    with pytest.raises(ConfigError, match="'q_porj' match no module of LlamaForCausalLM"):
        adapter(model, "lora", LoraConfig(target_modules=("q_proj", "q_porj")))
    with pytest.raises(ConfigError, match=r"'mlp\.up' match no module"):
        cfg = IA3Config(target_modules=("k_proj", "mlp.up"), feedforward_modules=("down_proj",))
        adapter(make_lm("llama")[0], "ia3", cfg)


def test_lora_parameter_count_is_r_times_in_plus_out_per_target():
    model, _ = make_lm("llama")  # d = 32, 4 heads of 8, 2 kv heads: q 32->32, v 32->16
    peft = adapter(model, "lora", LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    per_layer = 4 * (32 + 32) + 4 * (32 + 16)
    assert trainable_parameters(peft) == 2 * per_layer


def test_gpt2_needs_its_own_names():
    model, _ = make_lm("gpt2")
    adapter(model, "lora")  # PEFT's default for GPT-2 is c_attn
    with pytest.raises(ConfigError, match="'q_proj'"):
        adapter(make_lm("gpt2")[0], "lora", LoraConfig(target_modules=("q_proj",)))


def test_the_adapter_follows_the_method_name_not_the_config_class():
    class MyLora(LoraConfig):  # a user's subclass of the config: still LoRA
        pass

    res = lora(tiny_news_lm(0), tiny_task(), MyLora(r=2), train_cfg=_tcfg())
    layers = [m for m in res.backbone.modules() if isinstance(m, LoraLayer)]
    assert layers and all(not m.lora_magnitude_vector for m in layers)  # no DoRA magnitude
    assert res.method == "lora" and isinstance(res.config, MyLora)
    dora = run("tuning/dora", tiny_news_lm(0), tiny_task(), cfg=DoraConfig(r=2), train_cfg=_tcfg())
    assert any(m.lora_magnitude_vector for m in dora.backbone.modules() if isinstance(m, LoraLayer))
    with pytest.raises(ConfigError, match="takes a DoraConfig, not a LoraConfig"):
        run("tuning/dora", tiny_news_lm(0), tiny_task(), cfg=LoraConfig())
    with pytest.raises(ConfigError, match="no PEFT adapter named 'full_ft'"):
        adapter(make_lm("llama")[0], "full_ft")


def test_adapter_init_is_the_seeds_and_leaves_the_global_rng_alone():
    model = make_lm("llama")[0]  # building the model may draw; the state is taken after it
    state = torch.get_rng_state()
    a = adapter(model, "lora", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = adapter(make_lm("llama")[0], "lora", seed=3)
    c = adapter(make_lm("llama")[0], "lora", seed=4)
    key = next(k for k in a.state_dict() if "lora_A" in k)
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


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


@pytest.mark.parametrize("method, cfg", [("lora", LoraConfig()), ("ia3", IA3Config()),
                         ("prompt_tuning", PromptTuningConfig(num_virtual_tokens=4)),
                         ("prefix_tuning", PrefixTuningConfig(num_virtual_tokens=4))],
                         ids=["lora", "ia3", "prompt", "prefix"])  # fmt: skip
def test_saved_adapter_reloads_with_peft_and_same_logits(tmp_path, method, cfg):
    task = tiny_task()
    res = run("tuning", method, tiny_news_lm(0), task, cfg=cfg, train_cfg=_tcfg(3))
    res.save(tmp_path / "out")
    assert check_adapter_dir(tmp_path / "out" / "adapter") >= 1
    assert (tmp_path / "out" / "result.json").exists()
    want = res.scores(list(task.texts))
    again = PeftModel.from_pretrained(tiny_news_lm(0).model, str(tmp_path / "out" / "adapter"))
    got = VerbalizerLM(again.eval(), res.model.label_ids).eval()
    batch = res.tokenizer(task.prompts(), return_tensors="pt", padding=True, padding_side="left")
    torch.testing.assert_close(got(batch["input_ids"], batch["attention_mask"]), want)


def test_full_weights_save_with_the_tokenizer(tmp_path):
    from lfm.assets import load_model

    res = run("tuning/full_ft", tiny_news_lm(0), tiny_task(), train_cfg=_tcfg(1))
    res.save(tmp_path / "out")
    again = load_model(tmp_path / "out" / "model")
    x = ["Article: The team won.\nTopic:"]
    torch.testing.assert_close(again.next_token_logprobs(x), res.handle().next_token_logprobs(x))


@pytest.mark.parametrize("method", TRAINABLE)
def test_generate_works_after_each_method_and_the_callers_model_is_kept(method):
    handle = tiny_news_lm(0)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    tok, side = handle.tokenizer, handle.tokenizer.padding_side
    kw = {} if method == "mezo" else {"train_cfg": _tcfg()}
    res = run("tuning", method, handle, tiny_task(), cfg=SMALL.get(method), **kw)
    assert tok.padding_side == side  # the caller's tokenizer keeps its settings
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())
    enc = tok(["The team won", "Shares"], return_tensors="pt", padding=True, padding_side="left")
    out = res.backbone.generate(
        **enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    assert all(isinstance(s, str) for s in tok.batch_decode(out[:, -5:]))


def test_inplace_trains_the_handles_own_model():
    handle = tiny_news_lm(0)
    w = handle.model.model.layers[0].self_attn.q_proj.weight
    before = w.detach().clone()
    run("tuning/full_ft", handle, tiny_task(), train_cfg=_tcfg(1), inplace=True)
    assert not torch.equal(w, before)


def test_a_bare_module_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="tuning/lora trains a model with its tokenizer"):
        run("tuning/lora", make_lm("llama")[0], tiny_task(), train_cfg=_tcfg())


def test_a_causal_lm_without_label_words_is_refused():
    from lfm.tuning.tasks import TextClassification

    data = TextClassification(["a", "b"], torch.tensor([0, 1]), n_classes=2)
    with pytest.raises(ConfigError, match="a causal LM classifies through label words"):
        run("tuning/lora", tiny_news_lm(0), data, train_cfg=_tcfg())
