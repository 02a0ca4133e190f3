"""Training through the shared loop: every method lowers the loss; LP-FT, WiSE-FT, BitFit, resume."""

from __future__ import annotations

import pytest
import torch

from lfm.core.train import TrainConfig
from lfm.errors import ConfigError
from lfm.runs import Run
from lfm.tuning.classify import HeadClassifier, VerbalizerLM, accuracy_fn, predict
from lfm.tuning.methods import (
    BitFitConfig,
    LPFTConfig,
    WiseFTConfig,
    bitfit,
    snapshot,
    wise_curve,
    wise_ft,
)
from lfm.tuning.peft_methods import LoraCfg, PromptTuningCfg
from lfm.tuning.tiny import LABEL_IDS, tiny_batch, tiny_bert
from lfm.tuning.trainer import apply_method, method_config, trainable_parameters, tune

from conftest import make_lm

LR = {"full-ft": 3e-3, "bitfit": 3e-2, "lp-ft": 3e-3, "lora": 1e-2, "dora": 1e-2, "ia3": 3e-1,
      "prompt-tuning": 1e-1, "prefix-tuning": 5e-2}  # fmt: skip


def _tcfg(steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, progress=False, cpu=True, **kw)


@pytest.mark.parametrize("method", list(LR))
def test_training_lowers_the_loss(method):
    model, _ = make_lm("llama")
    cfg = method_config(method)
    clf = VerbalizerLM(apply_method(model, method, cfg), LABEL_IDS)
    hist = tune(clf, [tiny_batch(0, n=8)], cfg, _tcfg(12, LR[method]))
    assert len(hist.losses) == 12
    assert sum(hist.losses[-3:]) / 3 < hist.losses[0] - 0.05, hist.losses


def test_encoder_head_trains_with_an_adapter_and_a_soft_prompt():
    for cfg, method in (
        (LoraCfg(), "lora"),
        (PromptTuningCfg(num_virtual_tokens=4), "prompt-tuning"),
    ):
        clf = HeadClassifier(apply_method(tiny_bert(), method, cfg), n_classes=3)
        assert clf.head.weight.requires_grad
        hist = tune(clf, [tiny_batch(0, n=8)], cfg, _tcfg(12, 1e-2))
        assert hist.losses[-1] < hist.losses[0]


@pytest.mark.parametrize("head_lr", [0.1, None])
def test_a_new_head_trains_at_its_own_lr_and_the_adapter_at_its_own(head_lr):
    # AdamW's first step moves every element with a gradient by its group's lr (weight decay off).
    clf = HeadClassifier(apply_method(tiny_bert(), "lora", LoraCfg()), n_classes=3)
    before = snapshot(clf)
    tune(clf, [tiny_batch(0, n=8)], LoraCfg(), _tcfg(1, 1e-4, weight_decay=0.0), head_lr=head_lr)
    moves = {n: (p - before[n]).abs().max().item() for n, p in clf.named_parameters()}
    head = [v for n, v in moves.items() if n.startswith("head.")]
    lora = [v for n, v in moves.items() if "lora_B" in n]
    assert head == pytest.approx([head_lr or 1e-4] * 2, rel=1e-3)
    assert lora and max(lora) == pytest.approx(1e-4, rel=1e-3)


def test_bitfit_trains_biases_or_norms_and_can_refuse():
    bert = bitfit(tiny_bert())
    names = [n for n, p in bert.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("bias") for n in names)
    llama = bitfit(make_lm("llama")[0])  # no biases: RMSNorm gains, 2 per layer + the final one
    assert trainable_parameters(llama) == (2 * 2 + 1) * 32
    with pytest.raises(ConfigError, match="has no bias parameters"):
        bitfit(make_lm("llama")[0], BitFitConfig(fallback="error"))


def test_lp_ft_probe_changes_only_the_label_rows_then_everything():
    model, _ = make_lm("llama")
    clf = VerbalizerLM(apply_method(model, "lp-ft"), LABEL_IDS)
    w0, layer0 = clf.lm.lm_head.weight.detach().clone(), snapshot(clf.lm.model.layers[0])
    cfg = LPFTConfig(lp_fraction=0.5, lr=1e-2)
    tune(clf, [tiny_batch(0)], cfg, _tcfg(2, 1e-2).replace(steps=1 + 1))
    moved = (clf.lm.lm_head.weight - w0).abs().sum(1) > 0
    assert moved[list(LABEL_IDS)].all()
    assert any(
        not torch.equal(v, layer0[k]) for k, v in clf.lm.model.layers[0].state_dict().items()
    )
    probe_only = VerbalizerLM(apply_method(make_lm("llama")[0], "lp-ft"), LABEL_IDS)
    from lfm.tuning.trainer import _probe, ce_loss

    w0 = probe_only.lm.lm_head.weight.detach().clone()
    _probe(probe_only, ce_loss, [tiny_batch(0)], cfg, _tcfg(2, 1e-2), None)
    moved = ((probe_only.lm.lm_head.weight - w0).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert moved == sorted(LABEL_IDS)


def test_wise_ft_endpoints_and_curve():
    model, _ = make_lm("llama")
    clf = VerbalizerLM(apply_method(model, "full-ft"), LABEL_IDS)
    theta0 = snapshot(clf)
    tune(clf, [tiny_batch(0)], method_config("full-ft"), _tcfg(5, 1e-2))
    theta1 = snapshot(clf)
    for a, ref in ((0.0, theta0), (1.0, theta1)):
        got = wise_ft(theta0, theta1, WiseFTConfig(alpha=a))
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    half = wise_ft(theta0, theta1, WiseFTConfig(alpha=0.5))
    k = "lm.model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(half[k], (theta0[k] + theta1[k]) / 2)
    batches = [tiny_batch(0)]
    curve = wise_curve(clf, theta0, theta1, accuracy_fn(batches), alphas=(0.0, 1.0))
    assert [a for a, _ in curve] == [0.0, 1.0]
    torch.testing.assert_close(predict(clf, batches), predict(clf, batches))
    assert all(torch.equal(v, theta1[k]) for k, v in snapshot(clf).items())


def test_resume_matches_an_uninterrupted_run(tmp_path):
    def run_once(steps: int, run: Run) -> VerbalizerLM:
        clf = VerbalizerLM(apply_method(make_lm("llama")[0], "lora"), LABEL_IDS)
        tune(
            clf,
            [tiny_batch(0), tiny_batch(1)],
            LoraCfg(),
            _tcfg(steps, 1e-2, ckpt_every=2),
            run=run,
        )
        return clf

    full = run_once(6, Run("a", root=tmp_path))
    run_once(4, Run("b", path=tmp_path / "b", config={"x": 1}))  # stops at step 4 with a checkpoint
    resumed = run_once(6, Run("b", path=tmp_path / "b", config={"x": 1}))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        if "lora" in n:
            torch.testing.assert_close(p, q)
