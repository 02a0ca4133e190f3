"""FitNets' hint between transformer blocks, from a teacher served at HIDDEN: the registered
`distill/fitnets` loss on token rows, with the LM loss beside it, gives the same student through
the server (token ids over HTTP) as from the local handle, and the hint is what shapes it."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalModel, narrow
from lfm.core.tiny import tiny_lm
from lfm.core.train import TrainConfig
from lfm.distill import distill
from lfm.errors import AccessError
from lfm.registry import run
from lfm.serve.app import ServeSettings, build_app
from lfm.serve.backend import Backend
from lfm.serve.client import RemoteModel
from lfm.serve.thread import running

TEXT = (
    "The teacher reads the text and the student learns from what the teacher says. "
    "A small model can learn a great deal from a larger one when both see the same words. "
) * 6
STEPS = 6


@pytest.fixture(scope="module")
def teacher():
    return LocalModel(*tiny_lm("llama", 0), name="teacher")


@pytest.fixture(scope="module")
def blocks(teacher):
    ids = torch.tensor(teacher.encode(TEXT))
    n = len(ids) // 16
    return list(ids[: n * 16].view(n, 16).split(2))  # batches of 2 rows of 16 tokens


def _student(teacher, blocks, handle, hint_weight=1.0, seed=7):
    student = tiny_lm("llama", seed)[0].train()
    losses = [("fitnets", hint_weight, None, "model.layers.0", "model.layers.1")]
    cfg = TrainConfig(steps=STEPS, lr=1e-2, progress=False, seed=0)
    history = distill(handle, student, blocks, losses, train_cfg=cfg, label_weight=1.0)
    return student, history


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_served_hidden_teacher_gives_the_local_student(teacher, blocks):
    local, _ = _student(teacher, blocks, narrow(teacher, "hidden"))
    with running(build_app(Backend(teacher, "hidden"), ServeSettings(api_key="k"))) as url:
        remote = RemoteModel(url, api_key="k", access="hidden")
        served, _ = _student(teacher, blocks, remote)
    torch.testing.assert_close(_weights(served), _weights(local), rtol=1e-4, atol=1e-5)
    # the hint shaped it: the LM loss alone, or another teacher's states, give other students
    alone, _ = _student(teacher, blocks, narrow(teacher, "hidden"), hint_weight=0.0)
    other = LocalModel(*tiny_lm("llama", 3), name="other")
    elsewhere, _ = _student(other, blocks, narrow(other, "hidden"))
    for student in (alone, elsewhere):
        assert (_weights(student) - _weights(local)).abs().max() > 1e-3
    # and the LM loss is there beside it: with no hint the student still moves
    assert (_weights(alone) - _weights(tiny_lm("llama", 7)[0])).abs().max() > 1e-3


def test_the_hint_loss_falls_and_the_regressor_trains(teacher, blocks):
    student = tiny_lm("llama", 7)[0].train()
    handle = narrow(teacher, "hidden")
    res = run("distill/fitnets", handle, student, blocks * 4, student_module="model.layers.0",
              teacher_module="model.layers.1", label_weight=0.0,
              train_cfg=TrainConfig(steps=24, lr=1e-2, progress=False))  # fmt: skip
    losses = res.history.losses
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


def test_a_logit_loss_from_a_served_language_model_is_refused(teacher, blocks):
    student = tiny_lm("llama", 7)[0]
    with running(build_app(Backend(teacher, "hidden"), ServeSettings(api_key="k"))) as url:
        remote = RemoteModel(url, api_key="k", access="hidden")
        with pytest.raises(AccessError, match="use distill/topk_lm"):
            distill(remote, student, blocks, [("kd", 1.0, None)])
