"""LoRA+: the same adapter as LoRA, B trained at λ times A's learning rate."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model_state_dict

from lfm import registry
from lfm.core.runs import Run
from lfm.core.train import TrainConfig
from lfm.tuning.lora_plus import LoraPlusConfig, lora_plus
from lfm.tuning.tiny import tiny_news_lm, tiny_task


def _factors(result):
    named = dict(result.backbone.named_parameters())
    a = {k: v.detach() for k, v in named.items() if ".lora_A." in k}
    b = {k: v.detach() for k, v in named.items() if ".lora_B." in k}
    return a, b


def _one_step(method: str, **cfg):
    tcfg = TrainConfig(steps=1, lr=1e-3, weight_decay=0.0, seed=0, progress=False, cpu=True)
    return registry.run(f"tuning/{method}", tiny_news_lm(0), tiny_task(), cfg={"dropout": 0.0, **cfg},
                        train_cfg=tcfg, seed=0)  # fmt: skip


def test_b_moves_lambda_times_as_far_as_under_lora_and_a_the_same():
    lora_a, lora_b = _factors(_one_step("lora"))
    plus_a, plus_b = _factors(_one_step("lora_plus", lr_ratio=16.0))
    assert lora_a.keys() == plus_a.keys() and lora_b
    for k in lora_a:  # A starts equal and takes the same first Adam step
        assert torch.allclose(lora_a[k], plus_a[k], atol=1e-7)
    for k in lora_b:  # B starts at 0: after Adam's first step |B| ≈ lr (LoRA) vs λ·lr (LoRA+)
        ratio = plus_b[k].abs().max() / lora_b[k].abs().max()
        assert ratio.item() == pytest.approx(16.0, rel=1e-3)


def test_lr_ratio_one_is_lora():
    lora = _one_step("lora")
    plus = _one_step("lora_plus", lr_ratio=1.0)
    for (k, v), (_, w) in zip(
        sorted(_factors(lora)[1].items()), sorted(_factors(plus)[1].items()), strict=True
    ):
        assert torch.allclose(v, w, atol=1e-7), k


def test_lora_plus_records_its_name_config_run_and_evals_and_defaults_to_seed_0(tmp_path):
    task, cfg = tiny_task(), LoraPlusConfig(r=2, lr_ratio=4.0)
    tcfg = TrainConfig(steps=3, lr=1e-2, progress=False, cpu=True)
    res = lora_plus(tiny_news_lm(0), task, cfg, train_cfg=tcfg, eval_data=task,
                    run=Run("p", path=tmp_path / "p"), batch_size=2)  # fmt: skip
    assert res.method == "lora_plus" and res.config is cfg
    assert len(res.history) == 3 and res.evals  # the steps ran and the eval data was scored
    metrics = json.loads((tmp_path / "p" / "manifest.json").read_text())["metrics"]
    assert "acc" in metrics  # the run was written
    seeded = [lora_plus(tiny_news_lm(0), task, cfg, train_cfg=tcfg, seed=s) for s in (0, 1)]
    plain = lora_plus(tiny_news_lm(0), task, cfg, train_cfg=tcfg)
    state = [get_peft_model_state_dict(r.backbone) for r in (plain, *seeded)]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])  # seed 0 by default
    assert not all(torch.equal(state[0][k], state[2][k]) for k in state[0])  # seed 1 differs
    assert plain.history == seeded[0].history
    assert res.history != plain.history  # batch_size reached the training
