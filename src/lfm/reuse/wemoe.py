"""WEMoE (Tang et al. 2024, ICML, arXiv 2402.00433): merging as a weight-ensembling mixture of experts.

Most of the model is merged by task arithmetic, θ = θ_b + λ Σ_i τ_i with τ_i = θ_i − θ_b. The
chosen ("upscaled") modules — the paper: every Transformer MLP — keep the base weights and every
expert's task vector, and build their weights per input sample:

    θ(x) = θ_b + Σ_i r_i(x) τ_i,        r(x) = mean over tokens t of  W_2 ReLU(W_1 h_t + b_1) + b_2

h_t are the module's input features at token (or pixel) t. The router starts from small weights
(N(0, 0.01²)) and the bias b_2 = λ, so that at first every upscaled module is its task-arithmetic
merge; then only the routers are trained at test time, by minimising the entropy of each task
head's predictions on unlabelled test inputs (as AdaMerging, arXiv 2310.02575). The paper: two
router layers, λ = 0.3, Adam at lr 1e-4, 1,000 steps of 16 inputs per task.

`WeightEnsemblingMoE` wraps any module (a Linear, a Conv2d, a whole block) given its base and
expert weights. Routing is per sample, so one batch may mix inputs of several tasks: a module whose
parameters all enter linearly (Linear, conv, norm layers, elementwise activations between) adds
Σ_i r_i f(x; τ_i) at each parameter leaf; any other runs each sample with its own weights
(`torch.func.vmap` over `functional_call`). `upscale` builds the merged model, `train_routers`
adapts it; `wemoe` is both, registered.

Two options beside the paper's gate: `gate="softmax"` puts each module's coefficients on the
simplex (unnormalised coefficients let the routers lower the entropy by scaling every expert up,
where a head reads unnormalised features), and `batch_reduce` routes a whole batch of one task by
its mean (the option of that name in FusionBench's implementation). `objective="im"` subtracts
from each task's mean entropy the entropy of its batch's mean prediction (SHOT's information
maximisation), so that the routers cannot buy confidence by sending a task's inputs where its
head puts them all in a few classes.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lfm.access import Access, module_of, state_dict_of
from lfm.config import Config
from lfm.errors import ConfigError
from lfm.registry import Example, register
from lfm.reuse.contract import MOE
from lfm.reuse.driver import merge_state_dicts
from lfm.reuse.examples import batch, classifiers

StateDict = Mapping[str, Tensor]


class WEMoEConfig(Config):
    modules: str = r".*mlp"  # regex (full match) of the module names to upscale (paper: the MLPs)
    init: float = 0.3  # λ of the task-arithmetic merge and the routers' first output (paper: 0.3)
    router_layers: int = Field(2, ge=0, le=2)  # hidden layers; 0: a learned λ per expert (paper: 2)
    # "linear": the router's outputs are the coefficients (paper); "softmax": their softmax, so
    # the coefficients are a convex combination of the experts (they start at 1/K each)
    gate: Literal["linear", "softmax"] = "linear"
    # one routing per batch (the mean over its samples) instead of one per sample; batches must
    # then hold one task each, in training (`train_routers` runs the tasks apart) and after
    batch_reduce: bool = False
    # what the routers minimise per task: "entropy", the mean entropy of the head's predictions
    # (paper); "im", that minus the entropy of their batch mean (information maximisation, as in
    # SHOT, Liang et al. 2020): confident predictions that still spread over the classes
    objective: Literal["entropy", "im"] = "entropy"
    lr: float = Field(1e-4, gt=0)  # Adam learning rate of the routers (paper: 1e-4)
    steps: int = Field(1000, ge=0)  # test-time steps, one batch per task each (paper: 1000)
    seed: int = 0  # seeds the routers' initial weights

    @field_validator("modules")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        return pattern


class _Constant(nn.Module):
    """A router of depth 0: one learned coefficient per expert, the same for every input."""

    def __init__(self, k: int, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((k,), init))

    def forward(self, h: Tensor) -> Tensor:
        return self.weight.expand(*h.shape[:-1], -1)


def router(dim: int, k: int, init: float, layers: int = 2, seed: int = 0) -> nn.Module:
    """The paper's router from `dim` input features to `k` coefficients, starting near `init`.

    Weights are N(0, 0.01²) and hidden biases zero, the last bias is `init`: every coefficient is
    `init` up to a small input-dependent term, so the module starts as task arithmetic.
    """
    if layers == 0:
        return _Constant(k, init)
    gen = torch.Generator().manual_seed(seed)
    widths = [dim] * layers + [k]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.normal_(0.0, 0.01, generator=gen)
            lin.bias.fill_(init if i == layers - 1 else 0.0)
        mods += [lin, nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def tokens(x: Tensor) -> Tensor:
    """A module input as (B, N, C) token features: (B, C) one token, (B, T, C) as it is,
    (B, C, H, W) one token per pixel."""
    if x.dim() == 2:
        return x[:, None]
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    return x


# Modules whose output is linear in their parameters (all of them jointly, for a fixed input):
# f(x; θ_b + Σ_i r_i τ_i) = f(x; θ_b) + Σ_i r_i f(x; τ_i). A Linear or conv with its bias, a norm
# layer's scale and shift after normalising (BatchNorm by its running statistics in eval mode).
LINEAR_IN_PARAMS: tuple[type, ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
    nn.GroupNorm, nn.RMSNorm, nn.Embedding,
)  # fmt: skip


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def linear_in_params(module: nn.Module) -> bool:
    """Whether every module holding parameters directly is linear in them (GPT-2's Conv1D too)."""
    leaves = [m for m in module.modules() if _holds_parameters(m)]
    return all(isinstance(m, LINEAR_IN_PARAMS) or type(m).__name__ == "Conv1D" for m in leaves)


class _Mixed(nn.Module):
    """A parameter leaf of an upscaled module: f(x; θ_b) + Σ_i r_i f(x; τ_i), r per sample."""

    def __init__(self, inner: nn.Module, slots: dict[str, tuple[int, tuple[int, ...]]], ctx: dict):
        super().__init__()
        self.inner, self.slots, self.ctx = inner, slots, ctx

    def forward(self, *args: Tensor) -> Tensor:
        out = self.inner(*args)
        r, tau = self.ctx["r"], self.ctx["tau"]  # (B, K), (K, P)
        for i in range(len(tau)):
            own = {
                n: tau[i, o : o + torch.Size(s).numel()].view(s) for n, (o, s) in self.slots.items()
            }
            part = functional_call(self.inner, own, args)  # (B, ...)
            out = out + r[:, i].view(-1, *[1] * (part.dim() - 1)) * part
        return out


class WeightEnsemblingMoE(nn.Module):
    """One module whose weights are θ_b + Σ_i r_i(x) τ_i, per sample.

    Two exact ways to run it: when every parameter of the module enters linearly (Linear, conv and
    norm layers with elementwise activations between: an MLP, an inverted-residual block), each
    parameter leaf adds Σ_i r_i f(x; τ_i) to its base output, K more calls of the leaf on the
    whole batch; otherwise every sample runs the module with its own synthesised weights
    (`vmap` over `functional_call`), which costs B copies of the module's weights.

    Args:
        template: the module (its architecture and buffers; its parameters are replaced by base).
        base: the base parameters, by the template's parameter names.
        experts: each expert's parameters, by the same names.
        router: maps (B, N, C) token features of the input to (B, N, K) coefficients.
        by_leaf: force (True) or forbid (False) the per-leaf way; None: whenever it is exact.
        gate: "linear", the router's token mean is the coefficients (the paper); "softmax", their
            softmax over the experts.
        batch_reduce: one routing per call, the mean over the batch's samples (a batch must then
            hold one task), instead of one per sample.
    """

    theta: Tensor  # (P,) the base parameters, flattened in `names` order
    tau: Tensor  # (K, P) the experts' task vectors

    def __init__(
        self, template: nn.Module, base: StateDict, experts: Sequence[StateDict],
        router: nn.Module, by_leaf: bool | None = None, gate: str = "linear",
        batch_reduce: bool = False,
    ):  # fmt: skip
        super().__init__()
        if gate not in ("linear", "softmax"):
            raise ConfigError(f"gate must be 'linear' or 'softmax', not {gate!r}")
        self.gate, self.batch_reduce = gate, batch_reduce
        self.template = copy.deepcopy(template).requires_grad_(False)
        self.names = [n for n, _ in template.named_parameters()]
        self.shapes = [tuple(base[n].shape) for n in self.names]
        flat = lambda sd: torch.cat([sd[n].detach().float().flatten() for n in self.names])  # noqa: E731
        self.register_buffer("theta", flat(base))  # (P,)
        self.register_buffer("tau", torch.stack([flat(e) - self.theta for e in experts]))  # (K, P)
        self.router = router
        self.by_leaf = linear_in_params(template) if by_leaf is None else by_leaf
        self.ctx: dict[str, Tensor | None] = {"r": None, "tau": None}
        if self.by_leaf:
            self._wrap_leaves({n: base[n] for n in self.names})
        self.last_routing: Tensor | None = None  # the routing weights of the last call, (B, K)

    def _wrap_leaves(self, base: StateDict) -> None:
        """Give the template the base weights and wrap each parameter leaf in `_Mixed`."""
        with torch.no_grad():
            for n, p in self.template.named_parameters():
                p.copy_(base[n])
        sizes = [torch.Size(shape).numel() for shape in self.shapes]
        offsets = dict(zip(self.names, itertools.accumulate([0, *sizes[:-1]]), strict=True))
        leaves = [n for n, m in self.template.named_modules() if _holds_parameters(m)]
        for name in leaves:
            leaf = self.template.get_submodule(name)
            pre = name + "." if name else ""
            slots = {
                p: (offsets[pre + p], tuple(t.shape))
                for p, t in leaf.named_parameters(recurse=False)
            }
            mixed = _Mixed(leaf, slots, self.ctx)
            if not name:
                self.template = mixed
            else:
                parent, _, child = name.rpartition(".")
                setattr(self.template.get_submodule(parent), child, mixed)

    def routing(self, x: Tensor) -> Tensor:
        """Per-sample coefficients (B, K): the router on every token, averaged over tokens (with
        `batch_reduce`, over the batch too), and with the softmax gate their softmax over the
        experts."""
        r = self.router(tokens(x).float()).mean(1)
        if self.batch_reduce:
            r = r.mean(0, keepdim=True).expand(len(r), -1)
        return r.softmax(-1) if self.gate == "softmax" else r

    def weights(self, r: Tensor) -> dict[str, Tensor]:
        """Per-sample parameters θ_b + Σ_i r_i τ_i, each (B, *shape), from coefficients (B, K)."""
        flat = self.theta + r @ self.tau  # (B, P)
        parts = flat.split([torch.Size(s).numel() for s in self.shapes], dim=1)
        return {
            n: p.view(len(r), *s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def forward(self, x: Tensor) -> Tensor:
        r = self.routing(x)
        self.last_routing = r.detach()
        return self.mixed(x, r)

    def mixed(self, x: Tensor, r: Tensor) -> Tensor:
        """The module on each sample x[b] with its own weights θ_b + Σ_i r[b, i] τ_i."""
        r = r.to(self.theta.dtype)
        if self.by_leaf:
            self.ctx.update(r=r, tau=self.tau)
            try:
                return self.template(x)
            finally:
                self.ctx.update(r=None, tau=None)

        def one(params: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(self.template, params, (xb[None],))[0]

        return vmap(one)(self.weights(r), x)


def input_width(module: nn.Module, name: str) -> int:
    """The feature width of a module's input: that of its first Linear or convolution."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.in_channels
        if type(sub).__name__ == "Conv1D":  # GPT-2's linear layer, weight (in, out)
            return int(sub.get_parameter("weight").shape[0])
    raise ConfigError(f"cannot tell the input width of module {name!r}: it has no Linear or conv")


def _selected(model: nn.Module, pattern: str) -> list[str]:
    """Names of the modules matching `pattern`, outermost only (a match inside a match is not
    upscaled twice)."""
    names: list[str] = []
    for name, _ in model.named_modules():
        if (
            name
            and re.fullmatch(pattern, name)
            and not any(name.startswith(n + ".") for n in names)
        ):
            names.append(name)
    if not names:
        raise ConfigError(f"no module name matches modules={pattern!r}; see model.named_modules()")
    return names


def _under(sd: StateDict, name: str) -> dict[str, Tensor]:
    """The tensors of module `name` in a whole model's state dict, by their names inside it."""
    pre = name + "."
    return {n.removeprefix(pre): v for n, v in sd.items() if n.startswith(pre)}


def upscale(
    model: nn.Module, base: StateDict, experts: Sequence[StateDict], cfg: WEMoEConfig
) -> nn.Module:
    """A copy of `model` merged by task arithmetic (λ = `cfg.init`) whose modules matching
    `cfg.modules` are weight-ensembling MoEs; only their routers are trainable."""
    merged = copy.deepcopy(model)
    merged.load_state_dict(merge_state_dicts("task_arithmetic", base, experts, {"scale": cfg.init}))
    merged.requires_grad_(False)
    for i, name in enumerate(_selected(merged, cfg.modules)):
        sub = merged.get_submodule(name)
        start = cfg.init if cfg.gate == "linear" else 0.0  # softmax: equal logits, 1/K each
        r = router(input_width(sub, name), len(experts), start, cfg.router_layers, cfg.seed + i)
        moe = WeightEnsemblingMoE(
            sub,
            _under(base, name),
            [_under(e, name) for e in experts],
            r,
            gate=cfg.gate,
            batch_reduce=cfg.batch_reduce,
        )
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, moe)
    return merged.eval()


def moe_modules(model: nn.Module) -> dict[str, WeightEnsemblingMoE]:
    """The weight-ensembling MoE modules of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WeightEnsemblingMoE)}


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax of logits (B, C)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def information_loss(logits: Tensor) -> Tensor:
    """Mean entropy of the softmax of logits (B, C) minus the entropy of their mean over the
    batch: low when each prediction is confident and the batch's predictions spread over the
    classes (SHOT's information maximisation, Liang et al. 2020, arXiv 2002.08546)."""
    logp = logits.float().log_softmax(-1)
    log_mean = logp.logsumexp(0) - math.log(len(logp))  # log of the batch-mean probabilities
    return -(logp.exp() * logp).sum(-1).mean() + (log_mean.exp() * log_mean).sum()


def train_routers(
    model: nn.Module,
    batches: Sequence[Sequence[Tensor]],
    cfg: WEMoEConfig,
    heads: Sequence[Callable[[Tensor], Tensor]] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Test-time adaptation: Adam on the routers alone, minimising Σ_k H(head_k(model(x_k)))
    (with `cfg.objective == "im"`, Σ_k of `information_loss` instead).

    One step takes the next batch of every task (cycled) through the model together: routing is
    per sample, so mixing tasks in one batch changes nothing (with `cfg.batch_reduce`, each
    task's batch runs on its own). Returns the summed objective at each step, before its update.
    """
    score = information_loss if cfg.objective == "im" else entropy
    params = [p for m in moe_modules(model).values() for p in m.router.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    history: list[float] = []
    for step in range(cfg.steps):
        xs = [b[step % len(b)] for b in batches]
        if cfg.batch_reduce:  # one routing per batch: each task's batch on its own
            outs = [model(x) for x in xs]
        else:
            outs = list(model(torch.cat(xs)).split([len(x) for x in xs]))
        terms = [score(heads[k](o) if heads is not None else o) for k, o in enumerate(outs)]
        loss = sum(terms, torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step, history[-1])
    return history


@dataclass
class WEMoEResult:
    """The merged model (routers trained, eval mode) and the summed objective at each step (the
    entropy, or with `objective="im"` the information loss)."""

    model: nn.Module
    entropy: list[float] = field(default_factory=list)


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """Two tiny MLP experts onto a base, `fc1` upscaled, a few steps on unlabelled inputs."""
    modules, handles = classifiers(level, [seed, seed + 1, seed + 2])
    data = [[batch(seed + k)] for k in range(2)]
    cfg = WEMoEConfig(modules="fc1", steps=3, lr=0.05)

    def summary(res: Any) -> dict[str, Tensor]:
        return {"out": res.model(batch(seed)).detach(), "entropy": torch.tensor(res.entropy)}

    return Example((modules[0], handles[1:], handles[0], data), cfg=cfg, summary=summary)


# pragma: no mutate end


def wemoe(
    model: Any,
    models: Sequence[Any],
    base: Any,
    data: Sequence[Sequence[Tensor]],
    cfg: Any = None,
    heads: Sequence[Callable[[Tensor], Tensor]] | None = None,
) -> WEMoEResult:
    """Merge `models` onto `base` as a weight-ensembling MoE and train its routers on `data`.

    Args:
        model: a module of the shared architecture (its own weights are not used).
        models: the experts: white-box handles, modules or state dicts, fine-tuned from `base`.
        base: the pretrained model, likewise.
        data: per task, a list of unlabelled input batches (cycled over the steps).
        cfg: a `WEMoEConfig` (paper defaults).
        heads: per task, a function from the model's output to that task's logits.
    """
    arch = module_of(model, "reuse/wemoe")
    base_sd = state_dict_of(base, "reuse/wemoe")
    expert_sds = [state_dict_of(m, "reuse/wemoe") for m in models]
    if len(data) != len(expert_sds) or (heads is not None and len(heads) != len(data)):
        raise ConfigError("reuse/wemoe: give one list of batches (and one head) per expert")
    merged = upscale(arch, base_sd, expert_sds, cfg)
    history = train_routers(merged, data, cfg, heads)
    return WEMoEResult(merged.eval(), history)


wemoe = register(
    "reuse", "wemoe", shape=MOE, branch="mixture of experts", access=Access.WEIGHTS,
    config=WEMoEConfig, paper="Tang et al. 2024 (ICML), arXiv 2402.00433", example=_example,
    cli="no command: it needs the model, task heads and unlabelled data, in Python "
    "(lfm.reuse.wemoe.wemoe); bench/reuse_fusion_vision.py runs it on MobileNetV2",
)(wemoe)  # fmt: skip
