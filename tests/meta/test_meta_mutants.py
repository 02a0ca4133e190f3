"""Behaviour of the meta-learners' core that `make mutate AREA=meta` found untested: the overrides
of `inner_adapt` (step count, first order, adapted subset) against the config's values, meta-test
adapting `test_inner_steps` times, a meta-batch of one task without `vmap`, the explicit
`vectorize` settings, ProtoNets' prototypes on the device of their inputs, the error naming an
unmatched subset, and what a MAML-family registry entry provides (made here, at test time, under
a name of its own). The survivors that change nothing the methods promise are listed in
tests/mutation_equivalents.md.

Most checks use f(x) = w·x with the squared error on one support point (a, b): one inner step is
w ← w − α·2a(wa − b), and its derivative in w is 1 − 2αa² (1 when the step is first order).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from lfm import registry
from lfm.errors import LfmError
from lfm.meta import (
    ANILConfig,
    FOMAMLConfig,
    MAMLConfig,
    ReptileConfig,
    Task,
    inner_adapt,
)
from lfm.meta.contract import MetaResult
from lfm.meta.functional import MetaConfig, adapted_predict, can_vectorize, params_of, selected
from lfm.meta.models import MLP
from lfm.meta.protonets import prototypes
from lfm.meta.reptile import reptile_objective
from lfm.meta.tasks import regression

A, B, C, D, W0, ALPHA = 1.5, 2.0, -0.5, 1.0, 0.3, 0.1


def _scalar(batch: bool = False) -> tuple[nn.Module, Task]:
    """f(x) = w·x at w = W0; support (A, B), query (C, D); a leading task dimension if `batch`."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(W0)
    t = (lambda v: torch.tensor([[[v]]])) if batch else (lambda v: torch.tensor([[v]]))
    return model, Task(t(A), t(B), t(C), t(D))


def _w_after(steps: int, w: float = W0, lr: float = ALPHA) -> float:
    """w after `steps` gradient steps on (wA − B)², by hand."""
    for _ in range(steps):
        w = w - lr * 2 * A * (w * A - B)
    return w


def _adapt(cfg: MetaConfig, **kw) -> tuple[float, float]:
    """The adapted weight and its derivative in the initial weight."""
    model, task = _scalar()
    params = params_of(model)
    fast = inner_adapt(model, params, regression().loss, (task.xs, task.ys), cfg, **kw)
    (dw,) = torch.autograd.grad(fast["weight"].sum(), [params["weight"]])
    return fast["weight"].item(), dw.item()


SECOND = 1 - 2 * ALPHA * A * A  # dw'/dw of one second-order step
FIRST = 1.0  # of one first-order step: the inner gradient is a constant


# -- inner_adapt: its arguments override the config --------------------------------------------


@pytest.mark.parametrize("steps", [0, 3])
def test_steps_argument_overrides_the_configured_count(steps):
    w, _ = _adapt(MAMLConfig(inner_lr=ALPHA, inner_steps=1), steps=steps)
    assert w == pytest.approx(_w_after(steps), rel=1e-6)
    assert _w_after(steps) != pytest.approx(_w_after(1))


@pytest.mark.parametrize(
    ("cfg", "first_order", "want"),
    [
        (MAMLConfig(inner_lr=ALPHA), None, SECOND),  # the config's choice
        (FOMAMLConfig(inner_lr=ALPHA), None, FIRST),
        (MAMLConfig(inner_lr=ALPHA), True, FIRST),  # the argument wins
        (FOMAMLConfig(inner_lr=ALPHA), False, SECOND),
    ],
    ids=["maml", "fomaml", "maml-first", "fomaml-second"],
)
def test_first_order_argument_overrides_the_config(cfg, first_order, want):
    w, dw = _adapt(cfg, first_order=first_order)
    assert w == pytest.approx(_w_after(1), rel=1e-6)  # the same step either way
    assert dw == pytest.approx(want, rel=1e-6)


def test_select_argument_overrides_the_configured_subset():
    torch.manual_seed(0)
    model = MLP(1, 1, (4,))
    params = params_of(model)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    for cfg, select, moved in [
        (MAMLConfig(inner_lr=0.1), ["head"], "head."),  # () in the config: all, yet head only
        (ANILConfig(inner_lr=0.1), ["body"], "body."),  # ("head",) in the config, yet body only
    ]:
        fast = inner_adapt(model, params, regression().loss, (x, y), cfg, select=select)
        for name in params:
            changed = not torch.equal(fast[name], params[name])
            assert changed == name.startswith(moved), (select, name)


def test_an_unmatched_subset_is_named_in_the_error():
    with pytest.raises(LfmError, match=r"no parameter matches.*'nope'"):
        selected(params_of(MLP(1, 1, (4,))), ["nope"])


# -- meta-test adapts test_inner_steps times, first order; training inner_steps times -----------


def test_meta_test_adapts_test_inner_steps_times():
    model, task = _scalar()
    params = params_of(model)
    cfg = MAMLConfig(inner_lr=ALPHA, inner_steps=1, test_inner_steps=3)
    train = adapted_predict(model, params, task, regression(), cfg, None, True)
    test = adapted_predict(model, params, task, regression(), cfg, None, False)
    assert train.item() == pytest.approx(_w_after(1) * C, rel=1e-6)
    assert test.item() == pytest.approx(_w_after(3) * C, rel=1e-6)


def test_training_prediction_is_second_order_unless_first_order():
    for cfg, want in [(MAMLConfig(inner_lr=ALPHA), SECOND), (FOMAMLConfig(inner_lr=ALPHA), FIRST)]:
        model, task = _scalar()
        params = params_of(model)
        pred = adapted_predict(model, params, task, regression(), cfg, None, True)
        (g,) = torch.autograd.grad(pred.sum(), [params["weight"]])
        assert g.item() == pytest.approx(C * want, rel=1e-6)


# -- a meta-batch of one task, in a loop ------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [False, True])
def test_reptile_on_a_meta_batch_of_one_task(vectorize):
    model, tasks = _scalar(batch=True)
    cfg = ReptileConfig(inner_lr=ALPHA, inner_steps=2, meta_batch=1)
    out = reptile_objective(model, params_of(model), tasks, regression(), cfg, None, vectorize)
    assert out.grads["weight"].item() == pytest.approx(W0 - _w_after(2), rel=1e-6)  # θ − W
    assert out.loss.item() == pytest.approx((_w_after(2) * C - D) ** 2, rel=1e-6)


# -- the vectorize setting ------------------------------------------------------------------------


def test_always_and_never_decide_whatever_the_model():
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    plain = MLP(1, 1, (4,))
    assert can_vectorize(bn, "always") and can_vectorize(plain, "always")
    assert not can_vectorize(bn, "never") and not can_vectorize(plain, "never")


# -- ProtoNets' prototypes follow their inputs' device ----------------------------------------------


def test_prototypes_on_the_device_of_their_inputs():
    """The `meta` device stands in for an accelerator: a CPU tensor mixed in is refused there."""
    emb = torch.zeros(4, 3, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    protos = prototypes(emb, labels, 2)
    assert protos.device.type == "meta" and protos.shape == (2, 3)


# -- what a MAML-family registry entry provides -----------------------------------------------------


class ProbeConfig(MetaConfig):
    """A MAML-family config of this test's own."""

    inner_lr: float = ALPHA
    test_inner_steps: int = 3


def test_a_maml_family_entry_is_a_whole_learner():
    maml_module = importlib.import_module("lfm.meta.maml")
    name, key = "maml_probe", "meta/maml_probe"
    try:
        learn = maml_module._entry(name, ProbeConfig, "a paper, 2017")
        spec = registry.get(key)
        assert spec.config is ProbeConfig and spec.paper == "a paper, 2017"
        assert spec.branch in registry.AREAS["meta"] and f"--method {name}" in spec.cli
        # its objective is MAML's second-order query loss (closed forms above)
        model, tasks = _scalar(batch=True)
        params = params_of(model)
        cfg = ProbeConfig()
        out = spec.extras["objective"](model, params, tasks, regression(), cfg, None, False)
        w1 = _w_after(1)
        assert out.loss.item() == pytest.approx((w1 * C - D) ** 2, rel=1e-6)
        (g,) = torch.autograd.grad(out.loss, [params["weight"]])
        assert g.item() == pytest.approx(2 * C * (w1 * C - D) * SECOND, rel=1e-5)
        # its prediction adapts the way MAML does: test_inner_steps at meta-test
        task = Task(*(t[0] for t in tasks))
        pred = spec.extras["predict"](model, params, task, regression(), cfg, None, False)
        assert pred.item() == pytest.approx(_w_after(3) * C, rel=1e-6)
        # its example runs by the method's name, with its config
        ex = spec.example(spec.access, 0)
        assert isinstance(ex.cfg, ProbeConfig)
        result = registry.run(key, *ex.args, cfg=ex.cfg, **ex.kwargs)
        assert isinstance(result, MetaResult) and result.method == key
        assert len(result.history.loss) == ex.cfg.steps
        assert learn(MLP(1, 1, (4,)), ex.args[1], ex.cfg).method == key
    finally:
        registry._REGISTRY.pop(key, None)


# -- ProtoNets and the pretrained baseline: vmap and the loop agree ------------------------------


@pytest.mark.parametrize("method", ["protonets", "pretrain"])
def test_vmap_and_loop_agree_for_protonets_and_the_baseline(method):
    spec = registry.get(f"meta/{method}")
    ex = spec.example(spec.access, 0)
    model, sampler = ex.args[0].model, ex.args[1]
    tasks = sampler.sample(3, torch.Generator().manual_seed(0))
    params = params_of(model)
    outs = [
        spec.extras["objective"](model, params, tasks, sampler.problem, ex.cfg, None, vec)
        for vec in (True, False)
    ]
    grads = [torch.autograd.grad(o.loss, list(params.values())) for o in outs]
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
