"""Training through the tuners: every method lowers the loss; LP-FT, WiSE-FT, BitFit, resume."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalModel
from lfm.core.train import TrainConfig
from lfm.errors import ConfigError
from lfm.registry import run
from lfm.runs import Run
from lfm.tuning.classify import VerbalizerLM, accuracy_fn, ce_loss, class_batches, label_token_ids
from lfm.tuning.methods import (
    BitFitConfig,
    LPFTConfig,
    WiseFTConfig,
    bias_only,
    interpolate_weights,
    probe,
    wise_curve,
)
from lfm.tuning.peft_methods import LoraConfig, PromptTuningConfig
from lfm.tuning.tasks import TextClassification, Verbalizer
from lfm.tuning.tiny import WORDS, tiny_news_lm, tiny_task
from lfm.tuning.trainer import snapshot, trainable_parameters

from conftest import make_lm

LR = {"full_ft": 3e-3, "bitfit": 1e-1, "lp_ft": 3e-3, "lora": 1e-2, "dora": 1e-2, "ia3": 3e-1,
      "prompt_tuning": 1e-1, "prefix_tuning": 5e-2, "wise_ft": 3e-3}  # fmt: skip


def _tcfg(steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, progress=False, cpu=True, **kw)


def _encoder_task() -> TextClassification:
    task = tiny_task()
    return TextClassification(task.texts, task.labels, n_classes=3)


def _encoder() -> LocalModel:
    model, tok = make_lm("bert")
    return LocalModel(model, tok)


def _random_task(n: int = 8, length: int = 8, seed: int = 0) -> TextClassification:
    """Texts of random tokens with random labels, classified by the last token's label words:
    every example ends in its own token, so a soft prompt can separate them (a template ending
    in the same word for all, as the news task's, leaves a prompt only the label prior)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n, length), generator=g)
    labels = torch.randint(0, len(WORDS), (n,), generator=g)
    tok = tiny_news_lm(0).tokenizer
    return TextClassification([tok.decode(r) for r in ids], labels, Verbalizer("{text}", WORDS))


@pytest.mark.parametrize("method", list(LR))
def test_training_lowers_the_loss(method):
    res = run("tuning", method, tiny_news_lm(0), _random_task(), train_cfg=_tcfg(12, LR[method]),
              batch_size=8)  # fmt: skip
    assert len(res.history) == 12
    assert sum(res.history[-3:]) / 3 < res.history[0] - 0.05, res.history


def test_encoder_head_trains_with_an_adapter_and_a_soft_prompt():
    for method, cfg in (
        ("lora", LoraConfig()),
        ("prompt_tuning", PromptTuningConfig(num_virtual_tokens=4)),
    ):
        res = run("tuning", method, _encoder(), _encoder_task(), cfg=cfg, train_cfg=_tcfg(12, 1e-2),
                  batch_size=6)  # fmt: skip
        assert res.model.head.weight.requires_grad
        assert res.history[-1] < res.history[0]


@pytest.mark.parametrize("head_lr", [0.1, None])
def test_a_new_head_trains_at_its_own_lr_and_the_adapter_at_its_own(head_lr):
    # AdamW's first step moves every element with a gradient by its group's lr (weight decay off).
    # LoRA's B starts at 0, so after one step |B| = lr exactly; the head starts from its seed.
    from lfm.tuning.classify import HeadClassifier

    encoder = make_lm("bert")[0]
    state = torch.get_rng_state()
    start = HeadClassifier(encoder, 3, seed=0).head.state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # the head's init is the seed's alone
    res = run("tuning/lora", _encoder(), _encoder_task(), train_cfg=_tcfg(1, 1e-4, weight_decay=0.0),
              head_lr=head_lr, batch_size=6)  # fmt: skip
    head = [(res.model.head.state_dict()[k] - v).abs().max().item() for k, v in start.items()]
    lora = [p.abs().max().item() for n, p in res.model.named_parameters() if "lora_B" in n]
    assert head == pytest.approx([head_lr or 1e-4] * 2, rel=1e-3)
    assert lora and max(lora) == pytest.approx(1e-4, rel=1e-3)


def test_bitfit_trains_biases_or_norms_and_can_refuse():
    bert = bias_only(make_lm("bert")[0])
    names = [n for n, p in bert.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("bias") for n in names)
    llama = bias_only(make_lm("llama")[0])  # no biases: RMSNorm gains, 2 per layer + the final one
    assert trainable_parameters(llama) == (2 * 2 + 1) * 32
    with pytest.raises(ConfigError, match="has no bias parameters"):
        run("tuning/bitfit", tiny_news_lm(0), tiny_task(), cfg=BitFitConfig(fallback="error"))


def _verbalizer_lm(handle: LocalModel) -> tuple[VerbalizerLM, list]:
    task = tiny_task()
    clf = VerbalizerLM(handle.model, label_token_ids(handle.tokenizer, WORDS))
    return clf, class_batches(handle.tokenizer, task.prompts(), task.labels, 6)


def test_lp_ft_probe_changes_only_the_label_rows_then_everything():
    handle = tiny_news_lm(0)
    ids = label_token_ids(handle.tokenizer, WORDS)
    w0, layer0 = (
        handle.model.lm_head.weight.detach().clone(),
        snapshot(handle.model.model.layers[0]),
    )
    cfg = LPFTConfig(lp_fraction=0.5, lr=1e-2)
    res = run("tuning/lp_ft", handle, tiny_task(), cfg=cfg, train_cfg=_tcfg(2, 1e-2))
    lm = res.backbone
    assert ((lm.lm_head.weight - w0).abs().sum(1) > 0)[ids].all()
    assert any(not torch.equal(v, layer0[k]) for k, v in lm.model.layers[0].state_dict().items())
    probe_only, batches = _verbalizer_lm(tiny_news_lm(0))
    w0 = probe_only.lm.lm_head.weight.detach().clone()
    probe(probe_only, ce_loss, batches, cfg, _tcfg(2, 1e-2))
    moved = ((probe_only.lm.lm_head.weight - w0).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert moved == sorted(ids)
    with pytest.raises(ConfigError, match="LP-FT needs at least 2 steps"):
        run("tuning/lp_ft", tiny_news_lm(0), tiny_task(), train_cfg=_tcfg(1, 1e-2))


def test_wise_ft_endpoints_and_curve():
    handle = tiny_news_lm(0)
    theta0 = snapshot(handle.model)
    res = run("tuning/full_ft", handle, tiny_task(), cfg={"lr": 1e-2}, train_cfg=_tcfg(5, 1e-2))
    theta1 = snapshot(res.backbone)
    for a, ref in ((0.0, theta0), (1.0, theta1)):
        got = interpolate_weights(theta0, theta1, a)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    half = interpolate_weights(theta0, theta1, 0.5)
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(half[k], (theta0[k] + theta1[k]) / 2)
    clf, batches = _verbalizer_lm(LocalModel(res.backbone, handle.tokenizer))
    curve = wise_curve(
        clf.lm, theta0, theta1, lambda _m: accuracy_fn(batches)(clf), alphas=(0.0, 1.0)
    )
    assert [a for a, _ in curve] == [0.0, 1.0]
    assert all(torch.equal(v, theta1[k]) for k, v in snapshot(clf.lm).items())


def test_wise_ft_tunes_then_interpolates_with_the_zero_shot_weights():
    handle, task = tiny_news_lm(0), tiny_task()
    theta0 = snapshot(handle.model)
    tcfg = _tcfg(5, 1e-2)
    tuned = run("tuning/full_ft", handle, task, train_cfg=tcfg)
    cfg = WiseFTConfig(alpha=0.25, alphas=(0.0, 0.25, 1.0))
    wise = run("tuning/wise_ft", handle, task, cfg=cfg, train_cfg=tcfg, eval_data=task)
    theta1 = snapshot(tuned.backbone)  # the same run: same seed, data and steps
    want = interpolate_weights(theta0, theta1, 0.25)
    assert all(torch.allclose(v, want[k]) for k, v in snapshot(wise.backbone).items())
    curve = dict(wise.metrics["curve"])
    assert list(curve) == [0.0, 0.25, 1.0] and curve[0.25] == wise.metrics["acc"]
    assert wise.metrics["fine_tuned_acc"] == curve[1.0]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    def run_once(steps: int, path) -> torch.nn.Module:
        r = Run("b", path=path, config={"x": 1})
        res = run("tuning/lora", tiny_news_lm(0), tiny_task(), train_cfg=_tcfg(steps, 1e-2, ckpt_every=2),
                  run=r, batch_size=3)  # fmt: skip
        return res.model

    full = run_once(6, tmp_path / "a")
    run_once(4, tmp_path / "b")  # stops at step 4 with a checkpoint
    resumed = run_once(6, tmp_path / "b")
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        if "lora" in n:
            torch.testing.assert_close(p, q)
