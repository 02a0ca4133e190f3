"""What mutation testing (`make mutate AREA=tuning`) found untested in the PEFT methods
(`lfm.tuning.peft_methods`): each test fails with the mutants it was written against.

Pinned here: a tuner made now by `_tuner(name)` trains the named adapter exactly as the registered
one does (the seed, config, run, eval data, train config and options all reach the training), and
an entry made now by `_register(name)` is the whole registry entry (area, shape, branch, access,
config, paper, command, a runnable example); IA3's own targets reach PEFT; prompt tuning's init is
sampled vocabulary rows (or random, when asked); a causal LM's adapter is PEFT's causal-LM model
(so `generate` reads a soft prompt); prefix tuning's MLP, its one-line error, and its real-word
init drawn from the seed's own generator on the model's device; `adapter`'s defaults and error.
LoRA's config reaches PEFT whole (task type, its own targets, α/r scaling, dropout) and its
one-line error without default targets; LoRA+ without a train config trains at its own lr and
seed, B at λ times that.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModelForCausalLM, TaskType, get_peft_model_state_dict
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from torch import nn

from lfm import registry
from lfm.access import Access
from lfm.core.runs import Run
from lfm.core.train import History, TrainConfig
from lfm.errors import ConfigError
from lfm.tuning import peft_methods
from lfm.tuning.adapters import prefix_from_tokens
from lfm.tuning.contract import TUNER
from lfm.tuning.lora_plus import LORA_B, LoraPlusConfig, lora_plus
from lfm.tuning.peft_methods import (
    DoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    adapter,
    prefix_init,
)
from lfm.tuning.tiny import tiny_news_lm, tiny_task

from conftest import make_lm

N = 4  # virtual tokens of a soft prompt or prefix


def _tcfg(steps: int = 2, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, progress=False, cpu=True)


def _adapter_state(res) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(res.backbone)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(path) -> dict:
    return json.loads((path / "manifest.json").read_text())["metrics"]


# -- the tuners, made at test time ----------------------------------------------------------------


def test_a_tuner_made_now_trains_dora_as_the_registered_one_with_every_argument(tmp_path):
    task, cfg = tiny_task(), DoraConfig(r=2)
    kw = {"train_cfg": _tcfg(3), "eval_data": task, "seed": 3, "batch_size": 2}
    tune = peft_methods._tuner("dora")
    new = tune(tiny_news_lm(0), task, cfg, run=Run("a", path=tmp_path / "a"), **kw)
    old = peft_methods.dora(tiny_news_lm(0), task, cfg, run=Run("b", path=tmp_path / "b"), **kw)
    assert new.method == "dora" and new.config is cfg
    assert len(new.history) == 3 and new.history == old.history  # train_cfg, seed, batch_size
    assert new.evals and new.evals == old.evals  # the eval data reached the training
    assert _same_weights(_adapter_state(new), _adapter_state(old))
    layers = [m for m in new.backbone.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.r["default"] == 2 for m in layers)  # the config's rank
    assert all(m.lora_magnitude_vector for m in layers)  # DoRA's magnitude, by the name
    got, want = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")  # the run was written
    assert "acc" in got and got == want


def test_a_tuner_made_now_defaults_to_seed_0_and_builds_plain_lora():
    task, cfg = tiny_task(), LoraConfig(r=2)
    new = peft_methods._tuner("lora")(tiny_news_lm(0), task, cfg, train_cfg=_tcfg())
    seed0 = peft_methods.lora(tiny_news_lm(0), task, cfg, train_cfg=_tcfg(), seed=0)
    seed1 = peft_methods.lora(tiny_news_lm(0), task, cfg, train_cfg=_tcfg(), seed=1)
    assert new.history == seed0.history and new.history != seed1.history
    assert _same_weights(_adapter_state(new), _adapter_state(seed0))
    layers = [m for m in new.backbone.modules() if isinstance(m, LoraLayer)]
    assert layers and all(not m.lora_magnitude_vector for m in layers)  # no DoRA magnitude


def test_a_prefix_tuner_made_now_starts_from_the_seeds_words():
    task, cfg = tiny_task(), PrefixTuningConfig(num_virtual_tokens=N)
    tcfg = _tcfg(1, 1e-9)  # the prefix barely moves from its init
    new = peft_methods._tuner("prefix_tuning")(tiny_news_lm(0), task, cfg, train_cfg=tcfg, seed=5)
    old = peft_methods.prefix_tuning(tiny_news_lm(0), task, cfg, train_cfg=tcfg, seed=5)
    assert new.history == old.history
    assert _same_weights(_adapter_state(new), _adapter_state(old))
    want = prefix_init(tiny_news_lm(0).model, cfg, 5)
    (got,) = _adapter_state(new).values()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_tuners_name_and_help_text_say_what_it_trains():
    tune = peft_methods._tuner("ia3")
    assert tune.__name__ == tune.__qualname__ == "ia3"
    doc = tune.__doc__
    assert doc == peft_methods.ia3.__doc__  # what `help(lfm.tuning.ia3)` shows
    assert doc.startswith("Train the ia3 adapter of the handle's model on `data`")
    assert "(`TextClassification` or `Instructions`)" in doc
    assert doc.endswith("options of `tune_weights`: batch_size, head_lr, inplace.")


# -- the registry entries, made at test time ------------------------------------------------------


def test_a_peft_method_registered_now_is_a_whole_entry():
    keys = ("tuning/lora", "tuning/prompt_tuning")
    saved = {k: registry._REGISTRY.pop(k) for k in keys}
    try:
        fn = peft_methods._register("lora")
        spec = registry.get("tuning/lora")
        assert (spec.area, spec.name, spec.shape) == ("tuning", "lora", TUNER)
        assert spec.branch == "weight engineering" and spec.access is Access.WEIGHTS
        assert spec.config is LoraConfig and spec.paper == "Hu et al. 2021, arXiv 2106.09685"
        assert spec.cli == "lfm tuning train --method lora" and spec.fn is fn
        assert spec.example is not None and spec.example(spec.access, 0).cfg == LoraConfig()

        fn = peft_methods._register("prompt_tuning")
        spec = registry.get("tuning/prompt_tuning")
        assert spec.branch == "input engineering" and spec.config is PromptTuningConfig
        assert spec.paper == "Lester et al. 2021, arXiv 2104.08691"
        assert spec.cli == "lfm tuning train --method prompt_tuning"
        ex = spec.example(spec.access, 0)
        assert ex.cfg == PromptTuningConfig(num_virtual_tokens=N)  # the small example
        res = fn(*ex.args, cfg=ex.cfg, **ex.kwargs)  # the gated tuner runs by its name
        assert res.method == "prompt_tuning" and isinstance(res.config, PromptTuningConfig)
        want_ex = saved["tuning/prompt_tuning"].example(spec.access, 0)
        want = saved["tuning/prompt_tuning"].fn(*want_ex.args, cfg=want_ex.cfg, **want_ex.kwargs)
        assert res.history == want.history
        torch.testing.assert_close(ex.summary(res), want_ex.summary(want), rtol=0, atol=0)
    finally:
        registry._REGISTRY.update(saved)


# -- IA3 ----------------------------------------------------------------------------------------


def test_ia3_scales_exactly_the_modules_its_config_names():
    cfg = IA3Config(target_modules=("q_proj", "down_proj"), feedforward_modules=("down_proj",))
    model = adapter(make_lm("llama")[0], "ia3", cfg)
    scaled = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}
    assert set(scaled) == {"q_proj", "down_proj"}  # not PEFT's default k, v, down
    assert scaled["down_proj"].is_feedforward and not scaled["q_proj"].is_feedforward


class _Toy(nn.Module):
    """A model of an architecture PEFT has no default IA3 targets for."""

    config = SimpleNamespace(model_type="toy")

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(2, 2)


def test_ia3_without_default_targets_says_so_in_one_line():
    want = "no default IA3 targets for model type 'toy'; set target_modules"
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        adapter(_Toy(), "ia3")
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):  # the feed-forward ones
        adapter(_Toy(), "ia3", IA3Config(target_modules=("k",)))


# -- the task type: a causal LM's adapter is PEFT's causal-LM model -------------------------------


@pytest.mark.parametrize("method, cfg", [("ia3", IA3Config()),
                         ("prompt_tuning", PromptTuningConfig(num_virtual_tokens=N)),
                         ("prefix_tuning", PrefixTuningConfig(num_virtual_tokens=N))],
                         ids=["ia3", "prompt", "prefix"])  # fmt: skip
def test_a_causal_lms_adapter_is_saved_as_a_causal_lm_adapter(method, cfg):
    model = adapter(make_lm("llama")[0], method, cfg)
    assert isinstance(model, PeftModelForCausalLM)
    assert model.peft_config["default"].task_type == TaskType.CAUSAL_LM  # adapter_config.json's


def test_generate_reads_the_soft_prompt():
    x = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    model = adapter(make_lm("llama")[0], "prompt_tuning", PromptTuningConfig(num_virtual_tokens=N))
    model.eval()
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=1, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        prompted = model(input_ids=x, attention_mask=mask).logits[:, -1]
        plain = make_lm("llama")[0].eval()(input_ids=x).logits[:, -1]
    torch.testing.assert_close(out.scores[0], prompted, rtol=1e-4, atol=1e-5)
    assert (out.scores[0] - plain).abs().max() > 1e-3  # not the bare model's next token


# -- prompt tuning's init -----------------------------------------------------------------------


def _prompt_rows_in_vocab(init: str) -> torch.Tensor:
    """For each soft-prompt row, whether it equals a row of the model's input embeddings."""
    cfg = PromptTuningConfig(num_virtual_tokens=N, init=init)
    model = adapter(make_lm("llama")[0], "prompt_tuning", cfg, seed=2)
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    vocab = model.get_input_embeddings().weight.detach()
    return (prompt[:, None, :] == vocab[None, :, :]).all(-1).any(-1)


def test_prompt_tuning_starts_from_sampled_vocabulary_or_random_when_asked():
    assert _prompt_rows_in_vocab("sample_vocab").all()  # the default: the paper's init
    assert not _prompt_rows_in_vocab("random").any()  # PEFT's N(0, 1) rows


# -- prefix tuning --------------------------------------------------------------------------------


def test_prefix_projection_adds_the_papers_mlp():
    def linears(projection: bool) -> int:
        cfg = PrefixTuningConfig(num_virtual_tokens=N, projection=projection, init="random")
        model = adapter(make_lm("llama")[0], "prefix_tuning", cfg)
        return sum(isinstance(m, nn.Linear) for m in model.prompt_encoder.modules())

    assert linears(False) == 0 and linears(True) == 2  # embedding -> hidden -> keys and values


def test_prefix_words_with_projection_is_refused_in_one_line():
    want = (
        "prefix init='words' sets the keys and values directly; with projection=True "
        "set init='random'"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        PrefixTuningConfig(num_virtual_tokens=N, projection=True).to_peft(TaskType.CAUSAL_LM)


def test_prefix_init_is_the_seeds_own_draw_whatever_the_global_state():
    model = make_lm("llama")[0].eval()
    cfg = PrefixTuningConfig(num_virtual_tokens=N)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (N,), generator=g)
    want = prefix_from_tokens(model, ids)
    got = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        state = torch.get_rng_state()
        got.append(prefix_init(model, cfg, 7))
        assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def test_prefix_tokens_are_put_on_the_models_device(monkeypatch):
    seen = []

    def spy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        seen.append(ids.device)
        return prefix_from_tokens(model, ids)

    monkeypatch.setattr(peft_methods, "prefix_from_tokens", spy)
    model = make_lm("llama")[0].to("meta")  # stands for an accelerator: no data, another device
    out = prefix_init(model, PrefixTuningConfig(num_virtual_tokens=N), 0)
    assert seen == [torch.device("meta")] and out.shape[0] == N


# -- adapter(): its default seed and its error --------------------------------------------------


def test_adapter_default_seed_is_0():
    a = adapter(make_lm("llama")[0], "lora").state_dict()
    b = adapter(make_lm("llama")[0], "lora", seed=0).state_dict()
    keys = [k for k in a if "lora_A" in k]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)


def test_an_unknown_adapter_lists_every_choice():
    want = "no PEFT adapter named 'adam'; choose from lora, dora, ia3, prompt_tuning, prefix_tuning"
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        adapter(make_lm("llama")[0], "adam")


# -- LoRA and DoRA: what their config hands PEFT -------------------------------------------------


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("method, cfg", [("lora", LoraConfig(r=2)), ("dora", DoraConfig(r=2))],
                         ids=["lora", "dora"])  # fmt: skip
def test_a_causal_lms_lora_is_saved_as_a_causal_lm_adapter(method, cfg):
    model = adapter(make_lm("llama")[0], method, cfg)
    assert isinstance(model, PeftModelForCausalLM)
    assert model.peft_config["default"].task_type == TaskType.CAUSAL_LM
    assert LoraConfig().to_peft(TaskType.CAUSAL_LM).task_type == TaskType.CAUSAL_LM


def test_lora_adapts_exactly_the_modules_its_config_names():
    model = adapter(make_lm("llama")[0], "lora", LoraConfig(target_modules=("q_proj", "down_proj")))
    assert set(_lora_layers(model)) == {"q_proj", "down_proj"}  # not PEFT's default q, v
    assert model.peft_config["default"].target_modules == {"q_proj", "down_proj"}


def test_lora_scales_by_alpha_over_r_and_drops_out_at_the_configs_rate():
    model = adapter(make_lm("llama")[0], "lora", LoraConfig(r=2, alpha=12.0, dropout=0.3))
    layers = _lora_layers(model)
    assert set(layers) == {"q_proj", "v_proj"}  # PEFT's default for llama
    for layer in layers.values():
        assert layer.scaling["default"] == 6.0  # α / r
        assert layer.lora_dropout["default"].p == 0.3
    plain = _lora_layers(adapter(make_lm("llama")[0], "lora"))  # the defaults: α 16, r 8, 0.05
    assert all(m.scaling["default"] == 2.0 for m in plain.values())
    assert all(m.lora_dropout["default"].p == 0.05 for m in plain.values())


def test_lora_without_default_targets_says_so_in_one_line():
    want = "no default LoRA targets for model type 'toy'; set target_modules"
    for method in ("lora", "dora"):
        with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
            adapter(_Toy(), method)


# -- LoRA+: its train config when none is given --------------------------------------------------


def test_lora_plus_without_a_train_config_trains_at_its_own_lr_and_seed():
    seen = []

    def capture(model, loss_fn, batches, tcfg, **kw):
        seen.append(tcfg)
        return History()

    cfg = LoraPlusConfig(r=2, lr=3e-3, lr_ratio=4.0)
    res = lora_plus(tiny_news_lm(0), tiny_task(), cfg, seed=5, schedule=capture)
    (tcfg,) = seen
    assert tcfg.lr == 3e-3 and tcfg.seed == 5  # the method's lr (not the loop's), the seed
    assert tcfg.lr_groups == {LORA_B: pytest.approx(1.2e-2)}  # B at λ times A's
    assert res.method == "lora_plus"
