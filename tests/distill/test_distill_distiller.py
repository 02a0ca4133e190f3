"""The distiller: hooks by module name, the shared loop, handles at each level, access refusals."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalClassifier, narrow
from lfm.core.train import TrainConfig, shuffled_batches
from lfm.distill import DistillResult, distill
from lfm.distill.losses import KDConfig, kd_loss
from lfm.errors import AccessError, ConfigError
from lfm.registry import run

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


def test_a_loss_run_by_name_is_the_distiller_with_one_term():
    teacher, x = _teacher_and_data()
    torch.manual_seed(2)
    a, b = TinyMLP(hidden=8), TinyMLP(hidden=8)
    b.load_state_dict(a.state_dict())
    cfg = CFG.replace(steps=5)
    res = run("distill/kd", narrow(teacher, "scores"), a, [(x,)], cfg={"temperature": 2.0},
              train_cfg=cfg)  # fmt: skip
    hist = distill(narrow(teacher, "scores"), b, [(x,)], [("kd", 1.0, {"temperature": 2.0})], cfg)
    assert isinstance(res, DistillResult) and res.student is a
    assert res.history.losses == hist.losses and torch.equal(a.fc2.weight, b.fc2.weight)


@pytest.mark.parametrize("name", ["fitnets", "at", "rkd", "pkt"])
def test_a_hidden_handle_teaches_features_as_the_white_box_teacher_does(name):
    # one pass with hooks on the white-box module, `scores` and `hidden` through the handle
    torch.manual_seed(0)
    teacher = LocalClassifier(TinyCNN(width=8).eval())
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    runs = []
    for handle in (teacher, narrow(teacher, "hidden")):
        torch.manual_seed(1)
        student = TinyCNN(width=4)
        res = run(f"distill/{name}", handle, student, [(x[:8],), (x[8:],)],
                  train_cfg=CFG.replace(steps=6), student_module="conv2", teacher_module="conv2")  # fmt: skip
        runs.append((res.history.losses, student.head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0][-1] < runs[0][0][0]


def test_feature_losses_use_named_modules_and_leave_models_unchanged():
    teacher, x = _teacher_and_data()
    student = TinyMLP(hidden=8)
    names = [n for n, _ in student.named_modules()]
    losses = [
        ("kd", 0.5, None),
        ("fitnets", 1.0, None, "fc1", "fc1"),
        ("rkd", 1.0, None, "fc1", "fc1"),
    ]
    teacher.model.train()
    hist = distill(teacher, student, [(x[:32],), (x[32:],)], losses, CFG.replace(steps=20))
    assert len(hist.losses) == 20 and hist.losses[-1] < hist.losses[0]
    assert [n for n, _ in student.named_modules()] == names  # no projector left inside
    assert not student.fc1._forward_hooks and not teacher.model.fc1._forward_hooks
    # the teacher was frozen in eval mode for the run; its flags and mode are back
    assert teacher.model.training and all(p.requires_grad for p in teacher.model.parameters())


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
    with pytest.raises(AccessError, match=rf"distill/{name} needs HIDDEN.*only SCORES"):
        run(f"distill/{name}", narrow(teacher, "scores"), TinyMLP(), [(x,)], train_cfg=CFG,
            student_module="fc1", teacher_module="fc1")  # fmt: skip


def test_a_logit_loss_on_teacher_features_needs_hidden():
    teacher, x = _teacher_and_data()
    with pytest.raises(AccessError, match="distill/kd on module 'fc2' needs HIDDEN"):
        distill(narrow(teacher, "scores"), TinyMLP(), [(x,)], [("kd", 1.0, None, "fc2", "fc2")])


def test_logit_loss_on_labels_handle_is_refused():
    teacher, x = _teacher_and_data()
    with pytest.raises(AccessError, match=r"SCORES.*TEXT"):
        distill(narrow(teacher, "text"), TinyMLP(), [(x,)], [("kd", 1.0, None)], CFG)


def test_a_whole_method_is_not_a_loss_term():
    teacher, x = _teacher_and_data()
    with pytest.raises(ConfigError, match="distill/dfad is a whole method"):
        distill(teacher, TinyMLP(), [(x,)], [("dfad", 1.0, None)], CFG)
