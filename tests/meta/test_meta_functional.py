"""MAML-family maths against closed forms: second- vs first-order meta-gradients, vmap vs loop,
ANIL's head-only inner loop, Meta-SGD step sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm.errors import LfmError
from lfm.meta import (
    ANILConfig,
    FOMAMLConfig,
    MAMLConfig,
    MetaSGDConfig,
    SinusoidTasks,
    Task,
    anil,
    inner_adapt,
    metasgd,
)
from lfm.meta.functional import can_vectorize, params_of, selected
from lfm.meta.models import MLP
from lfm.meta.tasks import regression
from lfm.meta.train import query_objective

A, B, C, D, W0, ALPHA = 1.5, 2.0, -0.5, 1.0, 0.3, 0.1


def scalar_task() -> tuple[nn.Module, Task]:
    """f(x) = w·x; support (a, b), query (c, d): L(w) = (w·x − y)², closed forms below."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(W0)
    t = lambda v: torch.tensor([[[v]]])  # noqa: E731  (T=1, K=1, 1)
    return model, Task(t(A), t(B), t(C), t(D))


def closed_form(second_order: bool) -> float:
    w1 = W0 - ALPHA * 2 * A * (W0 * A - B)  # w' = w − α ∂L_s/∂w
    dq = 2 * C * (w1 * C - D)  # ∂L_q/∂w'
    return dq * (1 - 2 * ALPHA * A * A) if second_order else dq  # dw'/dw = 1 − 2αa²


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize(("cfg_cls", "second"), [(MAMLConfig, True), (FOMAMLConfig, False)])
def test_meta_gradient_matches_closed_form(cfg_cls, second, vectorize):
    model, task = scalar_task()
    params = params_of(model)
    out = query_objective(
        model, params, task, regression(), cfg_cls(inner_lr=ALPHA), None, vectorize
    )
    (g,) = torch.autograd.grad(out.loss, [params["weight"]])
    assert g.item() == pytest.approx(closed_form(second), rel=1e-5)


def test_maml_and_fomaml_gradients_differ():
    assert abs(closed_form(True) - closed_form(False)) > 0.1


def _grads(model, tasks, cfg, vectorize):
    params = params_of(model)
    out = query_objective(model, params, tasks, regression(), cfg, None, vectorize)
    return out.loss, torch.autograd.grad(out.loss, list(params.values()))


@pytest.mark.parametrize("cfg", [MAMLConfig(inner_steps=2), FOMAMLConfig(), ANILConfig()])
def test_vmap_equals_loop(cfg):
    torch.manual_seed(0)
    model = MLP(1, 1, (16, 16))
    tasks = SinusoidTasks(5, 7).sample(4, torch.Generator().manual_seed(0))
    loss_v, g_v = _grads(model, tasks, cfg, True)
    loss_l, g_l = _grads(model, tasks, cfg, False)
    assert torch.allclose(loss_v, loss_l, atol=1e-6)
    for a, b in zip(g_v, g_l, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_anil_adapts_only_the_head():
    torch.manual_seed(0)
    model = MLP(1, 1, (8, 8))
    task = SinusoidTasks(5, 5).sample(1, torch.Generator().manual_seed(1))
    params = params_of(model)
    fast = inner_adapt(
        model, params, regression().loss, (task.xs[0], task.ys[0]), ANILConfig(inner_steps=3)
    )
    for name in params:
        changed = not torch.equal(fast[name], params[name])
        assert changed == name.startswith("head."), name


def test_inner_subset_by_predicate_and_unknown_names():
    model = MLP(1, 1, (4,))
    assert selected(params_of(model), lambda n: n.endswith("bias")) == ["body.0.bias", "head.bias"]
    assert selected(params_of(model), ["body"]) == ["body.0.weight", "body.0.bias"]
    with pytest.raises(LfmError):
        selected(params_of(model), ["nope"])


def test_inner_adapt_does_not_touch_the_model():
    model, task = scalar_task()
    fast = inner_adapt(
        model,
        params_of(model),
        regression().loss,
        (task.xs[0], task.ys[0]),
        MAMLConfig(inner_lr=ALPHA),
    )
    assert model.weight.item() == pytest.approx(W0)
    assert fast["weight"].item() == pytest.approx(W0 - ALPHA * 2 * A * (W0 * A - B))


def test_metasgd_uses_and_learns_per_parameter_step_sizes():
    model, task = scalar_task()
    lrs = {"weight": torch.full((1, 1), 0.05)}
    fast = inner_adapt(
        model, params_of(model), regression().loss, (task.xs[0], task.ys[0]), MAMLConfig(), lrs=lrs
    )
    assert fast["weight"].item() == pytest.approx(W0 - 0.05 * 2 * A * (W0 * A - B))
    torch.manual_seed(0)
    cfg = MetaSGDConfig(steps=20, meta_batch=4, outer_lr=1e-2)
    hist = metasgd(MLP(1, 1, (8,)), SinusoidTasks(5, 5), cfg).history
    assert hist.inner_lrs is not None and set(hist.inner_lrs) == {
        "body.0.weight",
        "body.0.bias",
        "head.weight",
        "head.bias",
    }
    moved = max((t - cfg.inner_lr).abs().max().item() for t in hist.inner_lrs.values())
    assert moved > 1e-3


def test_batchnorm_in_train_mode_falls_back_to_a_loop(tiny_cnn):
    assert not can_vectorize(tiny_cnn.train(), "auto")
    assert can_vectorize(tiny_cnn.eval(), "auto")
    tiny_cnn.train()
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    from lfm.meta.tasks import EpisodeTasks

    sampler = EpisodeTasks(
        torch.cat([x] * 4), torch.cat([y] * 4), range(3), ways=3, shots=2, queries=2
    )
    cfg = ANILConfig(steps=2, meta_batch=2, inner_lr=0.1)
    result = anil(tiny_cnn, sampler, cfg)
    trained, hist = result.model, result.history
    assert len(hist.loss) == 2 and not torch.equal(trained.conv1.weight, tiny_cnn.conv1.weight)


def test_the_written_out_mlp_forward_equals_functional_call():
    from torch.func import functional_call

    from lfm.meta.functional import forward
    from lfm.meta.models import MLP

    torch.manual_seed(0)
    for model, x in ((MLP(3, 2, (5, 4)), torch.randn(7, 3)),
                     (MLP(12, 3, (6,), image=True), torch.randn(2, 3, 1, 3, 4))):  # fmt: skip
        params = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        want = functional_call(model, params, (x,))
        assert torch.equal(model.functional(params, x), want)
        assert torch.equal(forward(model, params, x), want)
        part = {n: t for n, t in params.items() if n.startswith("head")}  # the rest: its own
        assert torch.equal(model.functional(part, x), functional_call(model, part, (x,)))
    model.head = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Tanh())  # not written out
    params = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    assert model.functional(params, x) is None
    assert torch.equal(forward(model, params, x), functional_call(model, params, (x,)))
