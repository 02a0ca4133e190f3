"""WEMoE: the weight-ensembling MoE module against its experts and task arithmetic, per-sample
routing, the paper's router initialisation, and test-time training of the routers alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from lfm import registry
from lfm.assets.vision import InvertedResidual
from lfm.core.tiny import tiny_mlp
from lfm.errors import ConfigError
from lfm.reuse.wemoe import (
    WeightEnsemblingMoE,
    WEMoEConfig,
    _selected,
    entropy,
    information_loss,
    input_width,
    moe_modules,
    router,
    tokens,
    train_routers,
    upscale,
)

from conftest import make_lm


class Fixed(nn.Module):
    """A router that ignores its input and answers the given coefficients: one row (K,) for every
    sample, or one row per sample (B, K)."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value

    def forward(self, h: Tensor) -> Tensor:  # h: (B, N, C)
        v = self.value if self.value.dim() == 2 else self.value.expand(len(h), -1)
        return v[:, None].expand(-1, h.shape[1], -1)


class BySign(nn.Module):
    """A router that sends a token to expert 0 when its first feature is positive, else to 1."""

    def forward(self, h: Tensor) -> Tensor:
        first = (h[..., :1] > 0).float()
        return torch.cat([first, 1 - first], dim=-1)


def _perturbed(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out.eval()


def _family(module: nn.Module, k: int = 3) -> tuple[nn.Module, list[nn.Module]]:
    """A base (module perturbed) and k experts fine-tuned from it (perturbed again)."""
    base = _perturbed(module, 100)
    return base, [_perturbed(base, i) for i in range(k)]


def _task_arithmetic(base: dict, experts: list[dict], lam: float) -> dict:
    """θ_b + λ Σ_i (θ_i − θ_b) for float tensors, by hand."""
    ta = lambda n, b: b + lam * sum(e[n] - b for e in experts)  # noqa: E731
    return {n: ta(n, b) if b.is_floating_point() else b for n, b in base.items()}


def _moe(base: nn.Module, experts: list[nn.Module], rt: nn.Module, by_leaf=None):
    params = lambda m: dict(m.named_parameters())  # noqa: E731
    return WeightEnsemblingMoE(base, params(base), [params(e) for e in experts], rt, by_leaf)


MODULES = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "conv": (lambda: nn.Conv2d(3, 4, 3, padding=1), (4, 3, 5, 5)),
    "block": (lambda: InvertedResidual(8, 8, 1, 3), (4, 8, 6, 6)),
}


@pytest.mark.parametrize("by_leaf", [True, False], ids=["by-leaf", "vmap"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_one_hot_routing_gives_the_expert_and_constant_routing_task_arithmetic(kind, by_leaf):
    make, shape = MODULES[kind]
    torch.manual_seed(0)
    base, experts = _family(make().eval())
    x = torch.randn(shape)
    with torch.no_grad():
        for i, expert in enumerate(experts):
            moe = _moe(base, experts, Fixed(torch.eye(3)[i]), by_leaf).eval()
            assert moe.by_leaf == by_leaf
            torch.testing.assert_close(moe(x), expert(x), rtol=1e-5, atol=1e-5)
        lam = 0.3
        ta = copy.deepcopy(base)
        ta.load_state_dict(
            _task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], lam)
        )
        moe = _moe(base, experts, Fixed(torch.full((3,), lam)), by_leaf).eval()
        torch.testing.assert_close(moe(x), ta(x), rtol=1e-5, atol=1e-5)
        # all-zero routing is the base: the task vectors are what the routing adds
        zero = _moe(base, experts, Fixed(torch.zeros(3)), by_leaf).eval()
        torch.testing.assert_close(zero(x), base(x), rtol=1e-5, atol=1e-5)
        assert (moe(x) - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("by_leaf", [True, False], ids=["by-leaf", "vmap"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_routing_is_per_sample(kind, by_leaf):
    make, shape = MODULES[kind]
    torch.manual_seed(1)
    base, experts = _family(make().eval(), k=2)
    x = torch.randn(shape)
    x[0], x[1] = x[0].abs(), -x[1].abs()  # sample 0 goes to expert 0, sample 1 to expert 1
    with torch.no_grad():
        out = _moe(base, experts, BySign(), by_leaf).eval()(x[:2])
        torch.testing.assert_close(out[0], experts[0](x[:1])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], experts[1](x[1:2])[0], rtol=1e-5, atol=1e-5)
        # and a batch of one gives what the same sample gives inside the batch
        torch.testing.assert_close(out[1:], _moe(base, experts, BySign(), by_leaf)(x[1:2]))


def test_both_ways_agree_on_random_per_sample_routing():
    torch.manual_seed(2)
    base, experts = _family(InvertedResidual(8, 8, 1, 4).eval())
    x, r = torch.randn(5, 8, 4, 4), torch.randn(5, 3)
    fast = _moe(base, experts, Fixed(r), by_leaf=True).eval()
    slow = _moe(base, experts, Fixed(r), by_leaf=False).eval()
    assert fast.by_leaf and not slow.by_leaf
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)
        # and each sample is the module with its own weights θ_b + Σ_i r_i τ_i
        for b in range(5):
            m = copy.deepcopy(base)
            for n, p in m.named_parameters():
                p.copy_(p + sum(r[b, i] * (dict(e.named_parameters())[n] - p)
                                for i, e in enumerate(experts)))  # fmt: skip
            torch.testing.assert_close(fast(x)[b], m(x[b : b + 1])[0], rtol=1e-5, atol=1e-5)


def test_the_paper_router_starts_at_lambda_and_depends_on_the_input():
    rt = router(16, 4, init=0.3, layers=2, seed=0)
    h = torch.randn(2, 5, 16)
    out = rt(h)  # (2, 5, 4)
    assert out.shape == (2, 5, 4)
    assert (out - 0.3).abs().max() < 0.01  # weights N(0, 0.01²): every coefficient near λ
    assert (out[0] - out[1]).abs().max() > 0  # but not constant: it reads its input
    assert torch.equal(router(16, 4, 0.3, 2, seed=0)(h), out)  # seeded
    assert torch.equal(router(16, 4, 0.3, 0)(h), torch.full((2, 5, 4), 0.3))  # depth 0: λ


def test_upscale_merges_the_rest_by_task_arithmetic_and_starts_near_it():
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    sds = [e.state_dict() for e in experts]
    model = upscale(base, base.state_dict(), sds, WEMoEConfig(modules="fc1", init=0.3))
    assert list(moe_modules(model)) == ["fc1"]
    ta = _task_arithmetic(base.state_dict(), sds, 0.3)
    for n in ("fc2.weight", "fc2.bias"):
        torch.testing.assert_close(model.state_dict()[n], ta[n])
    ref = copy.deepcopy(base)
    ref.load_state_dict(ta)
    x = torch.randn(16, 8)
    with torch.no_grad():
        gap = (model(x) - ref(x)).abs().max()
    assert 0 < gap < 0.05  # the routers' small weights: close to task arithmetic, not equal
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc1.router.0.weight", "fc1.router.0.bias", "fc1.router.2.weight", "fc1.router.2.bias"
    }  # fmt: skip


def test_test_time_training_lowers_entropy_and_changes_only_the_routers():
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    cfg = WEMoEConfig(modules="fc1|fc2", steps=15, lr=0.05)
    model = upscale(base, base.state_dict(), [e.state_dict() for e in experts], cfg)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = [[torch.randn(16, 8, generator=gen) for _ in range(2)] for _ in range(2)]
    history = train_routers(model, data, cfg)
    assert len(history) == 15 and history[-1] < history[0] - 0.05
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".router." in n for n in changed)
    assert {n.split(".router.")[0] for n in changed} == {"fc1", "fc2"}


def test_run_by_name_with_heads_and_config_errors():
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    data = [[torch.randn(8, 8, generator=gen)] for _ in range(2)]
    heads = [nn.Identity(), lambda z: z[:, :2]]
    res = registry.run("reuse/wemoe", base, experts, base, data, cfg={"modules": "fc2", "steps": 2},
                       heads=heads)  # fmt: skip
    assert len(res.entropy) == 2 and list(moe_modules(res.model)) == ["fc2"]
    with pytest.raises(ConfigError, match=r"modules: .*not a regular expression"):
        WEMoEConfig.build(modules="fc[")
    with pytest.raises(ConfigError, match="no module name matches"):
        registry.run("reuse/wemoe", base, experts, base, data, cfg={"modules": "nope"})
    with pytest.raises(ConfigError, match="one list of batches"):
        registry.run("reuse/wemoe", base, experts, base, data[:1], cfg={"modules": "fc2"})


def test_upscales_the_mlps_of_a_language_model_by_default():
    base, _ = make_lm("llama", 0)
    experts = [_perturbed(base, s, 0.02) for s in (1, 2)]
    sds = [e.state_dict() for e in experts]
    model = upscale(base, base.state_dict(), sds, WEMoEConfig())
    assert list(moe_modules(model)) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for i in range(2):  # in place of the MLPs, where the forward pass goes
        assert isinstance(model.model.layers[i].mlp, WeightEnsemblingMoE)
    ids = torch.tensor([[0, 5, 9, 12], [0, 7, 7, 3]])
    with torch.no_grad():
        out = model(ids).logits
        ta = copy.deepcopy(base)
        ta.load_state_dict(_task_arithmetic(base.state_dict(), sds, 0.3))
        near = ta(ids).logits
        for m in moe_modules(model).values():  # every coefficient 1.0 instead of λ = 0.3
            m.router[-1].bias.fill_(1.0)
        far = model(ids).logits
    assert out.shape == (2, 4, base.config.vocab_size) and torch.isfinite(out).all()
    assert (out - near).abs().max() < 0.1 * (far - near).abs().max()  # the routers act


def test_tokens_of_an_image_are_its_pixels_and_matches_outermost_only():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(tokens(x), x.permute(0, 2, 3, 1).reshape(2, 20, 3))
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 2))
    assert _selected(net, r"0(\.[02])?") == ["0"]
    assert _selected(net, r"0\.[02]|1") == ["0.0", "0.2", "1"]
    assert torch.equal(router(5, 3, 0.3).state_dict()["2.weight"],
                       router(5, 3, 0.3, 2, 0).state_dict()["2.weight"])  # fmt: skip
    assert len([m for m in router(5, 3, 0.3) if isinstance(m, nn.Linear)]) == 2


def test_entropy_by_hand_is_per_row_then_averaged():
    """Rows [0, 0] and [ln 3, 0]: softmax (1/2, 1/2) and (3/4, 1/4), so entropies ln 2 and
    −(3/4 ln 3/4 + 1/4 ln 1/4); over columns, or over the whole matrix, gives other values."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    second = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy(logits).item() == pytest.approx((math.log(2.0) + second) / 2, abs=1e-6)
    three = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])  # a uniform row: ln 3
    p = torch.tensor([2.0, 0.0, -1.0]).softmax(0)
    want = (-(p * p.log()).sum().item() + math.log(3.0)) / 2
    assert entropy(three).item() == pytest.approx(want, abs=1e-6)


def test_the_last_routing_is_kept_per_sample():
    """What the benchmark reads to say which expert each input went to: (B, K) of the last call."""
    make, shape = MODULES["linear"]
    torch.manual_seed(1)
    base, experts = _family(make().eval(), k=2)
    x = torch.randn(shape)
    x[0], x[1] = x[0].abs(), -x[1].abs()
    moe = _moe(base, experts, BySign()).eval()
    assert moe.last_routing is None
    with torch.no_grad():
        moe(x[:2])
    assert moe.last_routing is not None and moe.last_routing.shape == (2, 2)
    assert moe.last_routing.argmax(-1).tolist() == [0, 1]


def test_input_width_is_the_first_linear_or_convs():
    from transformers.pytorch_utils import Conv1D

    assert input_width(nn.Sequential(nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 9)), "a") == 5
    assert input_width(nn.Sequential(nn.Conv2d(4, 6, 3), nn.Linear(6, 2)), "b") == 4
    assert input_width(nn.Sequential(nn.Conv1d(7, 2, 1)), "c") == 7
    assert input_width(nn.Sequential(Conv1D(11, 6)), "d") == 6  # GPT-2's: Conv1D(nf=out, nx=in)
    with pytest.raises(ConfigError, match=r"input width of module 'e\.f': it has no Linear"):
        input_width(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "e.f")


def test_train_routers_sums_each_tasks_head_entropy_and_cycles_its_batches():
    """With a step too small to move the routers, step s scores batch s mod n of every task
    under the initial routers: the history is the summed per-task entropy of those batches, each
    through its own head, and the callback sees each step's value."""
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    cfg = WEMoEConfig(modules="fc2", steps=5, lr=1e-30)
    model = upscale(base, base.state_dict(), [e.state_dict() for e in experts], cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(6, 8, generator=gen) for _ in range(2)],
               [torch.randn(4, 8, generator=gen) for _ in range(3)]]  # fmt: skip
    heads = [lambda z: z[:, :2], lambda z: 3 * z]
    with torch.no_grad():
        want = [sum(entropy(heads[k](model(b[s % len(b)]))).item() for k, b in enumerate(batches))
                for s in range(5)]  # fmt: skip
    seen = []
    got = train_routers(model, batches, cfg, heads, progress=lambda s, v: seen.append((s, v)))
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(v, 6) for v in got)) == 5  # every step scored other batches
    assert seen == list(enumerate(got))


def test_linear_in_params_knows_gpt2s_conv1d_and_refuses_other_leaves():
    from transformers.pytorch_utils import Conv1D

    from lfm.reuse.wemoe import linear_in_params

    assert linear_in_params(nn.Sequential(Conv1D(8, 4), nn.GELU(), Conv1D(4, 8)))
    assert linear_in_params(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4)))
    # a parameter inside a non-linearity
    assert not linear_in_params(nn.Sequential(nn.Linear(4, 8), nn.PReLU()))


def test_each_upscaled_module_gets_its_own_seeded_router():
    """Module i's router is `router(width, K, λ, layers, seed + i)`, weights and all."""
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    cfg = WEMoEConfig(modules="fc1|fc2", seed=7)
    model = upscale(base, base.state_dict(), [e.state_dict() for e in experts], cfg)
    for i, (name, m) in enumerate(moe_modules(model).items()):
        want = router(input_width(getattr(base, name), name), 2, cfg.init, cfg.router_layers, 7 + i)
        got = m.router.state_dict()
        assert all(torch.equal(t, got[k]) for k, t in want.state_dict().items()), name
    a, b = (m.router[0].weight for m in moe_modules(model).values())
    assert a.shape != b.shape or not torch.equal(a, b)


def test_wemoe_trains_on_each_tasks_head_and_names_itself_in_errors():
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    data = [[torch.randn(8, 8, generator=gen)] for _ in range(2)]
    heads = [lambda z: z[:, :2], lambda z: 3 * z]
    cfg = {"modules": "fc2", "steps": 1}
    res = registry.run("reuse/wemoe", base, experts, base, data, cfg=cfg, heads=heads)
    start = upscale(base, base.state_dict(), [e.state_dict() for e in experts],
                    WEMoEConfig(**cfg))  # fmt: skip
    with torch.no_grad():
        want = sum(entropy(h(start(x[0]))).item() for h, x in zip(heads, data, strict=True))
    assert res.entropy == [pytest.approx(want, abs=1e-5)]  # the first step's, through the heads
    from lfm.errors import LfmError

    with pytest.raises(LfmError, match=r"^reuse/wemoe needs a model in memory, not str"):
        registry.run("reuse/wemoe", "no-model", experts, base, data, cfg=cfg)


def test_softmax_gate_puts_the_coefficients_on_the_simplex():
    """gate="softmax": each sample's coefficients are the softmax of the router's token mean, so
    logits (0, ln 3) give experts weights (1/4, 3/4); the module is then that convex combination
    of the experts' weights. The upscaled routers start at equal logits: 1/K each."""
    make, shape = MODULES["block"]
    torch.manual_seed(3)
    base, experts = _family(make().eval(), k=2)
    x = torch.randn(shape)
    logits = torch.tensor([0.0, math.log(3.0)])
    params = lambda m: dict(m.named_parameters())  # noqa: E731
    soft = WeightEnsemblingMoE(base, params(base), [params(e) for e in experts], Fixed(logits),
                               gate="softmax").eval()  # fmt: skip
    convex = _moe(base, experts, Fixed(torch.tensor([0.25, 0.75]))).eval()
    with torch.no_grad():
        torch.testing.assert_close(soft(x), convex(x), rtol=1e-5, atol=1e-5)
        assert soft.last_routing is not None
        torch.testing.assert_close(soft.last_routing, torch.tensor([[0.25, 0.75]] * len(x)))
    small, experts3 = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2, 3)]
    model = upscale(small, small.state_dict(), [e.state_dict() for e in experts3],
                    WEMoEConfig(modules="fc1", gate="softmax"))  # fmt: skip
    with torch.no_grad():
        model(torch.randn(5, 8))
    r = model.fc1.last_routing
    assert r is not None and (r - 1 / 3).abs().max() < 0.01 and r.sum(-1).allclose(torch.ones(5))
    with pytest.raises(ConfigError, match="gate: "):
        WEMoEConfig.build(gate="sigmoid")


def test_batch_reduce_routes_a_batch_by_its_mean_and_training_keeps_tasks_apart():
    """batch_reduce: one routing per batch, the mean of its samples' routings (BySign sends
    sample 0 to expert 0 and sample 1 to expert 1: the pair gets (1/2, 1/2) each). In training,
    each task's batch is run on its own, so its routing is not averaged with other tasks'."""
    make, shape = MODULES["linear"]
    torch.manual_seed(1)
    base, experts = _family(make().eval(), k=2)
    x = torch.randn(shape)[:2]
    x[0], x[1] = x[0].abs(), -x[1].abs()
    params = lambda m: dict(m.named_parameters())  # noqa: E731
    red = WeightEnsemblingMoE(base, params(base), [params(e) for e in experts], BySign(),
                              batch_reduce=True).eval()  # fmt: skip
    half = _moe(base, experts, Fixed(torch.tensor([0.5, 0.5]))).eval()
    with torch.no_grad():
        torch.testing.assert_close(red(x), half(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(red(x[:1]), experts[0](x[:1]), rtol=1e-5, atol=1e-5)
    # training: the batch of task 1 alone decides its routing
    small, experts2 = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    cfg = WEMoEConfig(modules="fc2", steps=1, lr=1e-30, batch_reduce=True)
    model = upscale(small, small.state_dict(), [e.state_dict() for e in experts2], cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [[3 * torch.randn(6, 8, generator=gen)], [torch.randn(4, 8, generator=gen)]]
    with torch.no_grad():
        want = sum(entropy(model(b[0])).item() for b in batches)
        mixed = model(torch.cat([b[0] for b in batches])).split([6, 4])
        pooled = sum(entropy(o).item() for o in mixed)
    assert abs(want - pooled) > 1e-6  # pooling the tasks would route them together
    assert train_routers(model, batches, cfg) == [pytest.approx(want, abs=1e-6)]


def test_information_loss_by_hand_rewards_spread_predictions():
    """Rows [0, 0] and [ln 3, 0]: softmax (1/2, 1/2) and (3/4, 1/4), mean entropy as in
    `entropy`; their mean is (5/8, 3/8), whose entropy is subtracted."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    second = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    spread = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    want = (math.log(2.0) + second) / 2 - spread
    assert information_loss(logits).item() == pytest.approx(want, abs=1e-6)
    # as confident, but all on one class: higher by (nearly) ln 2
    same, apart = torch.tensor([[20.0, 0.0], [20.0, 0.0]]), torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    assert entropy(same).item() == pytest.approx(entropy(apart).item(), abs=1e-6)
    gap = information_loss(same).item() - information_loss(apart).item()
    assert gap == pytest.approx(math.log(2.0), abs=1e-3)


def test_train_routers_minimises_the_chosen_objective():
    """objective="im": each step's history is Σ_k information_loss of task k's batch through
    its head (a step too small to move the routers), not the entropy."""
    base, experts = tiny_mlp(0).eval(), [tiny_mlp(s).eval() for s in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(6, 8, generator=gen)], [torch.randn(4, 8, generator=gen)]]
    heads = [lambda z: z[:, :2], lambda z: 3 * z]
    got = {}
    for objective, score in (("im", information_loss), ("entropy", entropy)):
        cfg = WEMoEConfig(modules="fc2", steps=1, lr=1e-30, objective=objective)
        model = upscale(base, base.state_dict(), [e.state_dict() for e in experts], cfg)
        with torch.no_grad():
            want = sum(score(h(model(b[0]))).item() for h, b in zip(heads, batches, strict=True))
        got[objective] = train_routers(model, batches, cfg, heads)
        assert got[objective] == [pytest.approx(want, abs=1e-6)], objective
    assert abs(got["im"][0] - got["entropy"][0]) > 0.1
    with pytest.raises(ConfigError, match="objective: "):
        WEMoEConfig.build(objective="kl")
