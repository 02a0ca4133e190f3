"""The distiller: hooks by module name, the shared loop, and access refusals."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalClassifier, narrow
from lfm.core.train import TrainConfig, shuffled_batches
from lfm.distill import distill
from lfm.distill.losses import KDConfig, kd_loss
from lfm.errors import AccessError

from conftest import TinyCNN, TinyMLP

CFG = TrainConfig(steps=40, lr=1e-2, progress=False)


def _teacher_and_data():
    torch.manual_seed(0)
    teacher = LocalClassifier(TinyMLP(hidden=32), name="teacher")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    return teacher, x


def _gap(teacher, student, x) -> float:
    with torch.no_grad():
        return kd_loss(student(x), teacher.model(x), KDConfig(temperature=1.0)).item()


def test_kd_through_a_scores_handle_reduces_the_gap():
    teacher, x = _teacher_and_data()
    student = TinyMLP(hidden=8)
    before = _gap(teacher, student, x)
    hist = distill(narrow(teacher, "scores"), student, shuffled_batches(x, batch_size=16),
                   [("kd", 1.0, KDConfig(temperature=1.0))], CFG)  # fmt: skip
    assert _gap(teacher, student, x) < 0.2 * before
    assert hist.losses[-1] < hist.losses[0]


def test_feature_losses_use_named_modules_and_leave_models_unchanged():
    teacher, x = _teacher_and_data()
    student = TinyMLP(hidden=8)
    names = [n for n, _ in student.named_modules()]
    losses = [
        ("kd", 0.5, None),
        ("fitnets", 1.0, None, "fc1", "fc1"),
        ("rkd", 1.0, None, "fc1", "fc1"),
    ]
    hist = distill(teacher, student, [(x[:32],), (x[32:],)], losses, CFG.replace(steps=20))
    assert len(hist.losses) == 20 and hist.losses[-1] < hist.losses[0]
    assert [n for n, _ in student.named_modules()] == names  # no projector left inside
    assert not student.fc1._forward_hooks and not teacher.model.fc1._forward_hooks


def test_labels_and_evaluation_on_a_cnn():
    torch.manual_seed(0)
    teacher = LocalClassifier(TinyCNN(width=8))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cfg = CFG.replace(steps=4, eval_every=2)
    hist = distill(teacher, TinyCNN(width=4), [(x, y)], [("at", 1.0, None, "conv2", "conv2")], cfg,
                   label_weight=1.0, evaluate=lambda s: {"n": float(s.head.out_features)})  # fmt: skip
    assert [e["n"] for e in hist.evals] == [10.0, 10.0]


@pytest.mark.parametrize("name", ["fitnets", "at", "rkd", "pkt"])
def test_feature_loss_on_scores_handle_is_refused(name):
    teacher, x = _teacher_and_data()
    with pytest.raises(AccessError, match=r"HIDDEN.*SCORES"):
        distill(
            narrow(teacher, "scores"), TinyMLP(), [(x,)], [(name, 1.0, None, "fc1", "fc1")], CFG
        )


def test_logit_loss_on_labels_handle_is_refused():
    teacher, x = _teacher_and_data()
    with pytest.raises(AccessError, match=r"SCORES.*TEXT"):
        distill(narrow(teacher, "text"), TinyMLP(), [(x,)], [("kd", 1.0, None)], CFG)
