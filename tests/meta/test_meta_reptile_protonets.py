"""Reptile's update direction and ProtoNets' logits against hand computations."""

from __future__ import annotations

import pytest
import torch

from lfm.meta import ProtoNetsConfig, ReptileConfig, SinusoidTasks, Task, inner_adapt
from lfm.meta.functional import forward, params_of
from lfm.meta.models import MLP
from lfm.meta.protonets import proto_logits, proto_predict, prototypes
from lfm.meta.reptile import reptile_objective
from lfm.meta.tasks import classification, regression


def _setup():
    torch.manual_seed(0)
    model = MLP(1, 1, (8,))
    tasks = SinusoidTasks(5, 5).sample(3, torch.Generator().manual_seed(0))
    return model, params_of(model), tasks


@pytest.mark.parametrize("vectorize", [True, False])
def test_reptile_one_step_is_alpha_times_mean_gradient(vectorize):
    model, params, tasks = _setup()
    cfg = ReptileConfig(inner_steps=1, inner_lr=0.05)
    out = reptile_objective(model, params, tasks, regression(), cfg, None, vectorize)
    grads = []
    for i in range(3):
        loss = regression().loss(forward(model, params, tasks.xs[i]), tasks.ys[i])
        grads.append(torch.autograd.grad(loss, list(params.values())))
    for j, name in enumerate(params):
        expected = 0.05 * torch.stack([g[j] for g in grads]).mean(0)  # θ − W = α ∇L(θ)
        assert torch.allclose(out.grads[name], expected, atol=1e-6)


def test_reptile_direction_is_theta_minus_mean_adapted_weights():
    model, params, tasks = _setup()
    cfg = ReptileConfig(inner_steps=4)
    out = reptile_objective(model, params, tasks, regression(), cfg, None, True)
    adapted = [
        inner_adapt(model, params, regression().loss, (tasks.xs[i], tasks.ys[i]), cfg)
        for i in range(3)
    ]
    for name, p in params.items():
        mean_w = torch.stack([a[name].detach() for a in adapted]).mean(0)
        assert torch.allclose(out.grads[name], p.detach() - mean_w, atol=1e-6)


def test_prototypes_and_logits_by_hand():
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    protos = prototypes(emb, labels, 2)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    logits = proto_logits(torch.tensor([[1.0, 1.0]]), protos)
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0]]))  # −(0²+1²), −(1²+3²)


def test_proto_predict_through_an_identity_embedding():
    model = MLP(2, 2, ())
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.zero_()
    xs = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    task = Task(xs, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    logits = proto_predict(
        model, params_of(model), task, classification(2), ProtoNetsConfig(), None, False
    )
    assert torch.allclose(logits, torch.tensor([[-1.0, -5.0]]))  # prototypes (1,0) and (0,3)
