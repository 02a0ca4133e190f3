"""Meta-gradients of the functional core against a hand-written unroll.

The reference differentiates the inner steps with plain `torch.autograd.grad(create_graph=True)`
on a stateful `nn.Module`'s weights (the textbook MAML implementation), task by task; the core
uses `torch.func.grad` under `vmap`. Both must give the same ∇_θ of the mean query loss, for
MAML with several inner steps, FOMAML, ANIL, Meta-SGD (also ∇ of the step sizes), on an MLP and
on the batch-statistics ConvNet (whose `BatchStatNorm2d` exists because `nn.BatchNorm2d` fails
this comparison under `vmap`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lfm.meta import ANILConfig, FOMAMLConfig, MAMLConfig, MetaSGDConfig, SinusoidTasks, Task
from lfm.meta.functional import can_vectorize, params_of
from lfm.meta.models import MLP, BatchStatNorm2d, ConvNet
from lfm.meta.tasks import classification, regression
from lfm.meta.train import init_lrs, query_objective


def unrolled_meta_grads(model, tasks, loss_fn, cfg, lrs=None):
    """∇ of the mean query loss by explicit autograd through `cfg.inner_steps` SGD steps."""
    theta = dict(model.named_parameters())
    adapted = [n for n in theta if not cfg.inner_params or n.split(".")[0] in cfg.inner_params]
    leaves = list(theta.values()) + list((lrs or {}).values())
    total = 0.0
    for i in range(tasks.xs.shape[0]):
        w = dict(theta)
        for _ in range(cfg.inner_steps):
            loss = loss_fn(functional_call(model, w, (tasks.xs[i],)), tasks.ys[i])
            gs = torch.autograd.grad(loss, [w[n] for n in adapted], create_graph=True)
            for n, g in zip(adapted, gs, strict=True):
                g = g.detach() if cfg.first_order else g
                w[n] = w[n] - (lrs[n] if lrs else cfg.inner_lr) * g
        total = total + loss_fn(functional_call(model, w, (tasks.xq[i],)), tasks.yq[i])
    grads = torch.autograd.grad(total / tasks.xs.shape[0], leaves, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)]


def core_meta_grads(model, tasks, problem, cfg, lrs, vectorize):
    params = params_of(model)
    out = query_objective(model, params, tasks, problem, cfg, lrs, vectorize)
    leaves = list(params.values()) + list((lrs or {}).values())
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)]


def assert_close(got, want, atol):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=atol, rtol=1e-4), (a - b).abs().max()


CONFIGS = [
    MAMLConfig(inner_lr=0.05, inner_steps=3),
    FOMAMLConfig(inner_lr=0.05, inner_steps=2),
    ANILConfig(inner_lr=0.05, inner_steps=2),
    MetaSGDConfig(inner_lr=0.05, inner_steps=2),
]


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_mlp_meta_gradients_match_the_unroll(cfg, vectorize):
    torch.manual_seed(0)
    model = MLP(1, 1, (16, 16))
    tasks = SinusoidTasks(5, 7).sample(3, torch.Generator().manual_seed(0))
    lrs = init_lrs(params_of(model), cfg)
    if lrs:  # distinct step sizes per entry, so a mix-up of names would show
        lrs = {n: (t * torch.rand_like(t) * 2).detach().requires_grad_() for n, t in lrs.items()}
    want = unrolled_meta_grads(model, tasks, F.mse_loss, cfg, lrs)
    got = core_meta_grads(model, tasks, regression(), cfg, lrs, vectorize)
    assert_close(got, want, atol=1e-5)
    assert max(g.abs().max() for g in want) > 1e-3  # the comparison is not between zeros


def test_second_order_term_matters_on_this_problem():
    torch.manual_seed(0)
    model = MLP(1, 1, (16, 16))
    tasks = SinusoidTasks(5, 7).sample(3, torch.Generator().manual_seed(0))
    second = unrolled_meta_grads(model, tasks, F.mse_loss, CONFIGS[0])
    first = unrolled_meta_grads(model, tasks, F.mse_loss, CONFIGS[0].replace(first_order=True))
    assert max((a - b).abs().max() for a, b in zip(second, first, strict=True)) > 1e-3


def test_convnet_meta_gradients_match_the_unroll():
    """float64: BatchNorm over 3 images at 1×1 maps is ill-conditioned enough that float32
    rounding alone moves some entries by 1e-3; in float64 the two agree to 1e-10."""
    torch.manual_seed(0)
    model = ConvNet(3, 8, 4, 8).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 9, 1, 8, 8, generator=gen, dtype=torch.float64)  # (T, N·(K+Q), C, H, W)
    y = torch.arange(3).repeat(3).expand(2, 9)
    tasks = Task(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])  # 3-way 1-shot, 2 queries per class
    cfg = MAMLConfig(inner_lr=0.4, inner_steps=2)
    want = unrolled_meta_grads(model, tasks, F.cross_entropy, cfg)
    got = core_meta_grads(model, tasks, classification(3), cfg, None, True)
    assert_close(got, want, atol=1e-8)


def test_batch_stat_norm_equals_torch_batchnorm_without_running_stats():
    torch.manual_seed(0)
    ours, ref = BatchStatNorm2d(4), torch.nn.BatchNorm2d(4, track_running_stats=False)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
            m.bias.copy_(torch.tensor([0.1, 0.0, -0.3, 0.2]))
    x = torch.randn(5, 4, 3, 3) * 3 + 1
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    g_ours = torch.autograd.grad(ours(x).pow(2).sum(), [ours.weight, ours.bias])
    g_ref = torch.autograd.grad(ref(x).pow(2).sum(), [ref.weight, ref.bias])
    assert_close(list(g_ours), list(g_ref), atol=1e-4)


def test_auto_does_not_vmap_torch_batchnorm_and_stays_exact():
    """`nn.BatchNorm2d` without running statistics: `vectorize="auto"` must loop, since vmap
    through its fused backward gives wrong second-order gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, track_running_stats=False),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 16, 3),
    )
    x = torch.rand(2, 9, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3).repeat(3).expand(2, 9)
    tasks = Task(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    cfg = MAMLConfig(inner_lr=0.4, inner_steps=2)
    assert not can_vectorize(model, cfg.vectorize)
    want = unrolled_meta_grads(model, tasks, F.cross_entropy, cfg)
    got = core_meta_grads(model, tasks, classification(3), cfg, None, can_vectorize(model, "auto"))
    assert_close(got, want, atol=1e-4)
