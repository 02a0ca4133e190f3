"""Data-free distillation: DeepInversion, DAFL, DFAD and DFME on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from lfm.access import LocalClassifier, narrow
from lfm.core.hooks import frozen
from lfm.core.priors import total_variation
from lfm.core.train import TrainConfig
from lfm.distill import InputSpec
from lfm.distill.adversarial import (
    DFADConfig,
    DFMEConfig,
    dfad,
    dfme,
    discrepancy,
    forward_difference_grad,
    logits_from_logprobs,
)
from lfm.distill.datafree import (
    DAFLConfig,
    DeepInversionConfig,
    dafl,
    dafl_generator_loss,
    deep_inversion,
    deep_inversion_images,
    js_divergence,
)
from lfm.distill.game import Generator, sample
from lfm.errors import AccessError, LfmError

from conftest import TinyCNN


def bn_teacher(seed: int = 0) -> TinyCNN:
    """A TinyCNN whose BatchNorm layers hold running statistics of shifted, scaled data."""
    torch.manual_seed(seed)
    model = TinyCNN(width=8).train()
    with torch.no_grad():
        for _ in range(20):
            model(0.3 + 0.5 * torch.rand(32, 1, 8, 8))
    return model.eval()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and all(
        p.grad is None for p in model.parameters()
    )


def _mean(history, key, part) -> float:
    rows = history[:5] if part == "first" else history[-5:]
    return sum(h[key] for h in rows) / len(rows)


def test_total_variation_by_hand():  # DeepInversion's prior is the squared one (p = 2)
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    assert total_variation(x, p=2).item() == pytest.approx((4 + 9) / 2 + (1 + 4) / 2)


def test_deep_inversion_lowers_the_bn_statistics_loss_and_keeps_the_teacher():
    teacher = LocalClassifier(bn_teacher())
    before = _snapshot(teacher.model)
    cfg = DeepInversionConfig(steps=30, lr=0.1, bn_weight=1.0, batch_size=16)
    images, targets, hist = deep_inversion_images(teacher, (1, 8, 8), 10, cfg)
    assert hist[-1]["bn"] < 0.5 * hist[0]["bn"] and hist[-1]["ce"] < hist[0]["ce"]
    assert images.shape == (16, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert targets.tolist() == [i % 10 for i in range(16)]
    assert _unchanged(teacher.model, before)
    with pytest.raises(AccessError, match=r"WEIGHTS access.*only SCORES"):
        deep_inversion_images(narrow(teacher, "scores"), (1, 8, 8), 10, cfg)
    with pytest.raises(AccessError, match=r"distill/deep_inversion needs WEIGHTS.*only HIDDEN"):
        deep_inversion(narrow(teacher, "hidden"), TinyCNN(width=4), InputSpec((1, 8, 8), 10), cfg)


def test_deep_inversion_needs_the_input_shape_and_classes():
    with pytest.raises(LfmError, match=r"needs data=InputSpec\(shape, n_classes\)"):
        deep_inversion(bn_teacher(), TinyCNN(width=4), InputSpec((1, 8, 8)))


def test_js_divergence_by_hand():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    m = torch.tensor([0.75, 0.25])
    kl_p = (0.5 * (0.5 / m).log()).sum()
    kl_q = (1.0 * (1.0 / m[0]).log()).sum()
    js = js_divergence(p.log(), q.clamp_min(1e-30).log())
    assert js.item() == pytest.approx(0.5 * (kl_p + kl_q).item(), rel=1e-5)
    assert js_divergence(p.log(), p.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_competition_term_pushes_images_where_the_student_disagrees():
    teacher, student = bn_teacher(0), bn_teacher(1)
    cfg = DeepInversionConfig(steps=30, bn_weight=1.0, batch_size=16, competition_weight=10.0)
    before = _snapshot(student)
    _, _, hist = deep_inversion_images(teacher, (1, 8, 8), 10, cfg, student=student)
    assert _mean(hist, "comp", "last") < _mean(hist, "comp", "first")  # 1 − JS falls
    assert _unchanged(student, before) and not student.training
    _, _, off = deep_inversion_images(teacher, (1, 8, 8), 10, cfg.replace(competition_weight=0.0))
    assert "comp" not in off[0]


@pytest.mark.parametrize("competition", [0.0, 5.0])
def test_deep_inversion_teaches_the_student_on_its_images(competition):
    teacher = bn_teacher()
    torch.manual_seed(0)
    student = TinyCNN(width=4)
    cfg = DeepInversionConfig(
        steps=20, bn_weight=1.0, batch_size=16, competition_weight=competition, batches=3
    )
    probe = deep_inversion_images(teacher, (1, 8, 8), 10, cfg, seed=99)[0]  # held-out images

    def agreement() -> float:
        with torch.no_grad():
            return float(
                (student.eval()(probe).argmax(-1) == teacher(probe).argmax(-1)).float().mean()
            )

    start = agreement()
    train_cfg = TrainConfig(steps=60, lr=1e-2, progress=False)
    res = deep_inversion(teacher, student, InputSpec((1, 8, 8), 10), cfg, train_cfg=train_cfg)
    images = res.info["images"]
    assert images.shape == (48, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert res.student is student and agreement() > start + 0.2
    rounds = 3 if competition else 1
    assert len(res.history) == rounds and len(res.info["synthesis"]) == 3
    assert res.info["queries"] == 3 * 16 * 20 + (60 // rounds) * rounds * 16


def test_frozen_keeps_train_mode_when_asked_and_sample_uses_batch_statistics():
    net = TinyCNN(width=4).train()
    with frozen(net, train=True):  # DFAD's student while the generator ascends through it
        assert net.training and not any(p.requires_grad for p in net.parameters())
    with frozen(net, train=False):  # a teacher, and DFME's student under forward differences
        assert not net.training
    assert net.training and all(p.requires_grad for p in net.parameters())
    gen = Generator(nz=8, size=8, width=4).eval()
    x = sample(gen, 16, torch.Generator().manual_seed(0))
    assert gen.training and x.shape == (16, 1, 8, 8)  # running statistics lag a moving generator


def test_generator_width_comes_from_the_config():
    teacher = bn_teacher()
    cfg = DFADConfig(iterations=1, student_steps=1, batch_size=4, nz=8, generator_width=3)
    cfg_big = cfg.replace(generator_width=6)
    fashion = InputSpec((1, 28, 28), 10)
    small = dfad(teacher, TinyCNN(width=4), fashion, cfg).info["generator"]
    big = dfad(teacher, TinyCNN(width=4), fashion, cfg_big).info["generator"]
    assert small.fc.out_features == 2 * 3 * 7 * 7 and big.fc.out_features == 2 * 6 * 7 * 7
    assert small(torch.randn(2, 8)).shape == (2, 1, 28, 28)


def test_the_default_generator_follows_the_input_shape_or_asks_for_one():
    teacher, cfg = bn_teacher(), DFADConfig(iterations=1, student_steps=1, batch_size=4, nz=8)
    gen = dfad(teacher, TinyCNN(width=4), InputSpec((1, 8, 8)), cfg).info["generator"]
    assert gen(torch.randn(2, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(LfmError, match="distill/dfad needs data=InputSpec"):
        dfad(teacher, TinyCNN(width=4), None, cfg)
    with pytest.raises(LfmError, match=r"square .* not \(1, 8, 6\); pass a generator"):
        dfad(teacher, TinyCNN(width=4), InputSpec((1, 8, 6)), cfg)


def test_dafl_generator_loss_terms_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    feats = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    out = dafl_generator_loss(logits, feats, DAFLConfig(activation_weight=0.1, entropy_weight=5.0))
    oh = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert out["oh"].item() == pytest.approx(oh, rel=1e-5)
    assert out["a"].item() == pytest.approx(-1.5)
    assert out["ie"].item() == pytest.approx(-math.log(2), rel=1e-5)  # balanced: −H = −log C
    assert out["loss"].item() == pytest.approx(oh - 0.15 - 5 * math.log(2), rel=1e-5)


def test_dafl_generator_and_student_losses_fall():
    teacher = bn_teacher()
    before = _snapshot(teacher)
    torch.manual_seed(0)
    cfg = DAFLConfig(iterations=20, batch_size=16, nz=8, lr_g=1e-2, lr_s=1e-2, feature_module="bn2")
    res = dafl(teacher, TinyCNN(width=4), None, cfg, generator=Generator(nz=8, size=8, width=8))
    assert _mean(res.history, "g_loss", "last") < _mean(res.history, "g_loss", "first")
    assert _mean(res.history, "s_kd", "last") < _mean(res.history, "s_kd", "first")
    assert _unchanged(teacher, before) and res.info["queries"] == 20 * 16 * 2


def test_dfad_generator_raises_and_student_lowers_the_discrepancy():
    teacher = bn_teacher()
    gen = Generator(nz=8, size=8, width=8)
    cfg = DFADConfig(iterations=20, student_steps=1, batch_size=16, nz=8, lr_g=1e-2)
    frozen_student = dfad(teacher, TinyCNN(width=4), None, cfg.replace(lr_s=1e-12), generator=gen)
    assert _mean(frozen_student.history, "g_disc", "last") > _mean(
        frozen_student.history, "g_disc", "first"
    )
    torch.manual_seed(0)
    cfg = cfg.replace(lr_g=1e-12, student_steps=2, lr_s=0.05)
    res = dfad(teacher, TinyCNN(width=4), None, cfg, generator=Generator(nz=8, size=8, width=8))
    assert _mean(res.history, "s_disc", "last") < 0.7 * _mean(res.history, "s_disc", "first")


def test_forward_difference_gradient_correlates_with_the_true_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 4, 4, generator=g)
    w = torch.randn(1, 4, 4, generator=g)

    def f(v: torch.Tensor) -> torch.Tensor:
        return (torch.sin(v) * w).flatten(1).sum(1)

    true = torch.cos(x) * w
    est = forward_difference_grad(f, x, m=400, eps=1e-3, g=g)
    cos = torch.nn.functional.cosine_similarity(est.flatten(1), true.flatten(1), dim=1)
    assert (cos > 0.8).all(), cos
    one = forward_difference_grad(
        f, x, m=1, eps=1e-3, g=g
    )  # m = 1, as in the paper: unbiased, noisy
    assert one.shape == x.shape and one.isfinite().all()


def test_logit_recovery_and_discrepancy():
    z = torch.tensor([[1.0, 2.0, 6.0]])
    torch.testing.assert_close(logits_from_logprobs(z.log_softmax(-1)), z - z.mean())
    assert discrepancy(z, z + torch.tensor([[1.0, -2.0, 0.0]])).tolist() == [1.0]


def test_dfme_runs_through_a_scores_handle_and_never_touches_the_teacher():
    teacher = LocalClassifier(bn_teacher())
    before = _snapshot(teacher.model)
    api = narrow(teacher, "scores")
    cfg = DFMEConfig(iterations=25, student_steps=2, batch_size=8, nz=8, directions=2, lr_s=0.05)
    torch.manual_seed(0)
    res = dfme(api, TinyCNN(width=4), None, cfg, generator=Generator(nz=8, size=8, width=8))
    assert res.info["queries"] == 25 * (8 * (2 + 1) + 2 * 8)
    assert _unchanged(teacher.model, before)
    assert _mean(res.history, "s_disc", "last") < _mean(res.history, "s_disc", "first")
    budget = dfme(
        api,
        TinyCNN(width=4),
        None,
        cfg.replace(query_budget=100),
        generator=Generator(nz=8, size=8, width=8),
    )
    assert 100 <= budget.info["queries"] < 100 + 8 * 3 + 2 * 8 and len(budget.history) == 3
    with pytest.raises(AccessError, match=r"distill/dfme needs SCORES access.*only TEXT"):
        dfme(narrow(teacher, "text"), TinyCNN(width=4), InputSpec((1, 8, 8)), cfg)
