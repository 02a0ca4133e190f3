"""Data-free meta-learning: meta-learn from a pool of pretrained classifiers, without their data.

Each pool model m_i classifies its own few classes. A pseudo task is recovered from m_i by model
inversion: inputs x = sigmoid(z) are optimised so that m_i assigns them chosen labels y,

    min_z  CE(m_i(x), y) + λ_bn R_bn(x) + λ_tv TV(x) − λ_adv L_meta(x),

and the meta-learner (a prototypical network, Snell et al. 2017, arXiv 1703.05175) is trained on
the episodes cut from these inputs (support: the first K per class, query: the rest).

- `datafree_whitebox` (after PURER, Hu et al. 2023, "Architecture, Dataset and Model-Scale
  Agnostic Data-free Meta-Learning", arXiv 2303.11183): gradients flow through the pool model;
  R_bn matches the batch statistics at each BatchNorm input to its running statistics
  (DeepInversion, Yin et al. 2020, arXiv 1912.08795); the −λ_adv term makes the episodes harder
  for the current meta-learner (PURER's episode curriculum); episodes persist in a memory bank
  per model and are refined a few steps at a time.
- `datafree_blackbox` (after BiDf-MKD, Hu et al. 2023, "Learning to Learn from APIs: Black-Box
  Data-Free Meta-Learning", arXiv 2305.18413): the pool model answers only log-probabilities
  (a SCORES handle). The gradient of its loss is estimated by random-direction finite
  differences, ĝ = (1/q) Σ_j [(f(z + μu_j) − f(z)) / μ] u_j with u_j ~ N(0, I), and its soft
  outputs on the queries are distilled into the meta-learner, KL(p_m(·|x) ‖ p_θ(·|x, S)).

Both are learners `(model, tasks, cfg) -> MetaResult` with `tasks` a `ModelPool`; the registry
checks the pool's handles (WEIGHTS, SCORES) before they run. TV is the absolute total variation
(p = 1 of `lfm.core.priors.total_variation`, `tv_p`), R_bn `lfm.core.priors.bn_prior`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import trange

from lfm.access import Access, LocalClassifier, module_of, narrow
from lfm.core import placement
from lfm.core.checkpoints import Checkpoints, prefixed
from lfm.core.priors import bn_prior, total_variation
from lfm.errors import LfmError
from lfm.meta.baseline import train_pool
from lfm.meta.contract import LEARNER, History, MetaResult, ModelPool
from lfm.meta.functional import OuterConfig, Params, forward, params_of
from lfm.meta.models import MLP
from lfm.meta.protonets import proto_logits, proto_predict, prototypes
from lfm.meta.tasks import EpisodeTasks
from lfm.meta.tiny import blobs, summary_of
from lfm.registry import Example, register

Oracle = Callable[[Any, Tensor, Tensor], Tensor]  # (handle, z, y) -> ∂ model loss / ∂z


class DataFreeConfig(OuterConfig):
    """White-box data-free meta-learning (PURER-like)."""

    meta_batch: int = 1  # pseudo episodes per meta-update (ProtoNets: one)
    steps: int = 200  # meta-updates (PURER runs many thousands; short for CPUs)
    ways: int = 5  # N: classes per pseudo episode (= each pool model's classes)
    shots: int = 1  # K: pseudo support examples per class
    queries: int = 5  # pseudo query examples per class
    inv_steps: int = 10  # inversion steps each time a memory-bank episode is drawn
    inv_lr: float = 0.1  # Adam step size on the inversion variables z
    bn: float = 1.0  # λ_bn: BatchNorm-statistics prior (needs WEIGHTS)
    tv: float = 1e-3  # λ_tv: total-variation prior on images
    tv_p: Literal[1, 2] = 1  # p of TV: 1, the absolute variant (DeepInversion's paper: 2)
    adv: float = 0.1  # λ_adv: push episodes toward what the meta-learner gets wrong
    kd: float = 0.0  # weight of distilling the pool model's soft query outputs
    temperature: float = 1.0  # distillation temperature


class BlackBoxConfig(DataFreeConfig):
    """Black-box data-free meta-learning (BiDf-MKD-like): zeroth-order inversion plus KD."""

    bn: float = 0.0  # no BatchNorm prior: the statistics are behind the API
    kd: float = 1.0  # BiDf-MKD distils the API's outputs into the meta-learner
    directions: int = 20  # q: random directions per gradient estimate
    mu: float = 0.05  # finite-difference step in z-space


def whitebox_grad(cfg: DataFreeConfig) -> Oracle:
    """∂/∂z of CE + λ_bn R_bn through the pool model's weights (WEIGHTS access)."""

    def grad(handle: Any, z: Tensor, y: Tensor) -> Tensor:
        z = z.detach().requires_grad_()
        logits, prior = bn_prior(module_of(handle), torch.sigmoid(z))
        return torch.autograd.grad(F.cross_entropy(logits, y) + cfg.bn * prior, z)[0]

    return grad


def zeroth_order_grad(cfg: BlackBoxConfig, gen: torch.Generator) -> Oracle:
    """Random-direction finite-difference estimate of ∂ CE(scores(sigmoid z), y) / ∂z."""

    def grad(handle: Any, z: Tensor, y: Tensor) -> Tensor:
        q, b = cfg.directions, z.shape[0]
        u = torch.randn((q, *z.shape), generator=gen).to(z.device)  # drawn on the CPU: seeded
        zs = torch.cat([z[None], z[None] + cfg.mu * u]).flatten(0, 1)  # ((q+1)·B, ...)
        logp = handle.scores(torch.sigmoid(zs)).to(z.device).view(q + 1, b, -1)
        f = -logp.gather(-1, y.expand(q + 1, b)[..., None]).squeeze(-1)  # per-sample CE (q+1, B)
        slope = (f[1:] - f[:1]) / cfg.mu  # (q, B)
        return (slope.view(q, b, *[1] * (z.dim() - 1)) * u).mean(0) / b

    return grad


def episode_split(
    cfg: DataFreeConfig, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Labels of a bank (class-major) and the indices of its support and query rows."""
    per = cfg.shots + cfg.queries
    y = torch.arange(cfg.ways, device=device).repeat_interleave(per)
    pos = torch.arange(len(y), device=device) % per
    return y, torch.nonzero(pos < cfg.shots).flatten(), torch.nonzero(pos >= cfg.shots).flatten()


def learner_logits(
    learner: nn.Module, params: Params, x: Tensor, cfg: DataFreeConfig
) -> tuple[Tensor, Tensor]:
    """ProtoNet query logits (Q, N) of a bank episode, and its query labels."""
    y, s, q = episode_split(cfg, x.device)
    emb = forward(learner, params, x)
    return proto_logits(emb[q], prototypes(emb[s], y[s], cfg.ways)), y[q]


def invert(
    oracle: Oracle, handle: Any, z: Tensor, learner: nn.Module, params: Params, cfg: DataFreeConfig
) -> Tensor:
    """Refine one memory-bank episode z by `inv_steps` Adam steps on the inversion objective."""
    y = episode_split(cfg, z.device)[0]
    z = z.clone().requires_grad_()
    opt = torch.optim.Adam([z], lr=cfg.inv_lr)
    frozen = {n: p.detach() for n, p in params.items()}
    for _ in range(cfg.inv_steps):
        x = torch.sigmoid(z)
        logits, yq = learner_logits(learner, frozen, x, cfg)
        local = cfg.tv * total_variation(x, cfg.tv_p) - cfg.adv * F.cross_entropy(logits, yq)
        (g_local,) = torch.autograd.grad(local, z)
        z.grad = oracle(handle, z.detach(), y) + g_local
        opt.step()
    return z.detach()


def episode_loss(
    handle: Any, learner: nn.Module, params: Params, x: Tensor, cfg: DataFreeConfig
) -> Tensor:
    """Query cross-entropy of the meta-learner, plus distillation of the pool model's outputs."""
    logits, yq = learner_logits(learner, params, x, cfg)
    loss = F.cross_entropy(logits, yq)
    if cfg.kd > 0:
        t = cfg.temperature
        queries = x[episode_split(cfg, x.device)[2]]
        teacher = (handle.scores(queries).to(x.device).float() / t).log_softmax(-1)
        kl = F.kl_div((logits / t).log_softmax(-1), teacher, log_target=True, reduction="batchmean")
        loss = loss + cfg.kd * t * t * kl
    return loss


def datafree_train(
    pool: Sequence[Any],
    learner: nn.Module,
    input_shape: Sequence[int],
    cfg: DataFreeConfig,
    oracle: Oracle,
    gen: torch.Generator,
    progress: bool = False,
    desc: str = "meta",
    ckpt: Checkpoints | None = None,
) -> tuple[nn.Module, History]:
    """Meta-train a copy of `learner` on pseudo episodes inverted from the pool models (a
    progress bar named `desc` if `progress`; checkpoints into `ckpt`'s run at its interval, and
    continues from a checkpoint found there)."""
    home = placement.device_of(learner)
    device = placement.loop_device(learner)  # the pool's models must be there too
    learner = copy.deepcopy(learner).to(device)
    params = params_of(learner)
    opt = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    n = cfg.ways * (cfg.shots + cfg.queries)
    banks = [torch.randn((n, *input_shape), generator=gen).to(device) for _ in pool]
    history = History()
    loop = _Loop(learner, banks, opt, gen, pool, history)
    start = loop.resume(ckpt) if ckpt else 0
    bar = trange(start, cfg.steps, initial=start, total=cfg.steps, disable=not progress,
                 desc=desc, leave=False)  # fmt: skip
    for step in bar:
        losses = []
        for _ in range(cfg.meta_batch):
            i = int(torch.randint(len(pool), (1,), generator=gen))
            with placement.autocast(device):  # `--dtype`: forward passes; z, θ, Adam stay fp32
                banks[i] = invert(oracle, pool[i], banks[i], learner, params, cfg)
                x = torch.sigmoid(banks[i])
                losses.append(episode_loss(pool[i], learner, params, x, cfg).float())
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.loss.append(float(loss.detach()))
        if ckpt and ckpt.due(step + 1, cfg.steps):
            loop.save(ckpt, step + 1)
    return learner.to(home), history


@dataclass
class _Loop:
    """What the remaining meta-updates depend on: the learner, the memory banks, Adam, the
    episode generator (also the zeroth-order directions'), the losses and the queries so far."""

    learner: nn.Module
    banks: list[Tensor]  # replaced as episodes are refined: read at each save
    opt: torch.optim.Optimizer
    gen: torch.Generator
    pool: Sequence[Any]
    history: History

    def tensors(self) -> dict[str, Tensor]:
        banks = {f"bank/{i}": b for i, b in enumerate(self.banks)}
        return {**prefixed("learner", self.learner), **banks}

    def save(self, ckpt: Checkpoints, step: int) -> None:
        queries = [getattr(h, "queries", 0) for h in self.pool]
        ckpt.write(step, self.tensors(), {"optimizer": self.opt}, loss=list(self.history.loss),
                   generator=self.gen.get_state(), queries=queries)  # fmt: skip

    def resume(self, ckpt: Checkpoints) -> int:
        """Restore a checkpoint in place; the meta-updates it was saved after (0: none)."""
        state = ckpt.read(self.tensors(), {"optimizer": self.opt})
        if state is None:
            return 0
        self.gen.set_state(state["generator"])
        self.history.loss[:] = [float(v) for v in state["loss"]]
        for h, q in zip(self.pool, state["queries"], strict=True):
            if isinstance(h, CountedScores):
                h.queries = int(q)
        return int(state["step"])


class CountedScores:
    """A SCORES view of a handle that counts the inputs sent to it (the query budget)."""

    access = Access.SCORES

    def __init__(self, handle: Any):
        self._handle, self.queries = handle, 0

    def scores(self, x: Tensor) -> Tensor:
        self.queries += x.shape[0]
        return self._handle.scores(x)


def model_pool(tasks: Any, key: str) -> ModelPool:
    """`tasks` if it is a `ModelPool`, else an error saying what a data-free learner takes."""
    if not isinstance(tasks, ModelPool):
        raise LfmError(f"{key} learns from a ModelPool(handles, input_shape), not from tasks")
    return tasks


def pool_example(config: type[DataFreeConfig], **knobs: Any) -> Any:
    """`example(level, seed)`: meta-learn from two 3-way blob classifiers whose handles give
    `level`; `knobs` are more config fields (the black-box estimate's size)."""

    def example(level: Access, seed: int) -> Example:
        torch.manual_seed(seed)
        x, y = blobs(seed, 9, 6)
        train = EpisodeTasks(x, y, range(6), ways=3, shots=1, queries=2)
        pool = train_pool(train, lambda: MLP(4, 3, (8,)), n_models=2, ways=3, steps=20, seed=seed)
        tasks = ModelPool([narrow(LocalClassifier(m), level) for m in pool], (4,))
        cfg = config(steps=3, ways=3, shots=1, queries=2, inv_steps=2, **knobs)
        test = EpisodeTasks(x, y, range(3, 9), ways=3, shots=1, queries=2)
        learner = LocalClassifier(MLP(4, 8, (8,)))
        return Example((learner, tasks), cfg=cfg, summary=summary_of(test, cfg, seed))

    return example


@register(
    "meta", "datafree_whitebox", shape=LEARNER, branch="white-box data-free",
    access=Access.WEIGHTS, config=DataFreeConfig, paper="Hu et al. 2023 (PURER), arXiv 2303.11183",
    example=pool_example(DataFreeConfig), predict=proto_predict,
    cli="lfm meta datafree --method datafree_whitebox",
)  # fmt: skip
def datafree_whitebox(
    model: Any,
    tasks: ModelPool,
    cfg: DataFreeConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
) -> MetaResult:
    """PURER-like data-free meta-learning through the pool models' weights.

    Args:
        model: the embedding network meta-learned as a prototypical network (an `nn.Module` or a
            `LocalClassifier`); a trained copy is returned.
        tasks: a `ModelPool` of WEIGHTS handles (`LocalClassifier`) of `cfg.ways`-way classifiers
            in eval mode, and the shape of one input, e.g. (1, 8, 8).
        cfg: the method's config.
        seed: seeds the memory banks and the episode order.
        progress: show a progress bar over the meta-updates.
        ckpt: checkpoint into a run directory (the learner, the memory banks, Adam, the
            generator, the losses), and resume from the checkpoint there.
    """
    key = "meta/datafree_whitebox"
    pool, learner = model_pool(tasks, key), module_of(model, key)
    gen, oracle = torch.Generator().manual_seed(seed), whitebox_grad(cfg)
    trained, history = datafree_train(
        list(pool.handles), learner, pool.input_shape, cfg, oracle, gen, progress, key, ckpt
    )
    return MetaResult(trained, history, key)


@register(
    "meta", "datafree_blackbox", shape=LEARNER, branch="black-box data-free",
    access=Access.SCORES, config=BlackBoxConfig,
    paper="Hu et al. 2023 (BiDf-MKD), arXiv 2305.18413",
    example=pool_example(BlackBoxConfig, directions=4), predict=proto_predict,
    cli="lfm meta datafree --method datafree_blackbox",
)  # fmt: skip
def datafree_blackbox(
    model: Any,
    tasks: ModelPool,
    cfg: BlackBoxConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    ckpt: Checkpoints | None = None,
) -> MetaResult:
    """BiDf-MKD-like data-free meta-learning from SCORES handles only (no weights touched).

    Args: as `datafree_whitebox`, with pool handles that give at least SCORES. The history's
    `queries` counts the inputs sent to the pool models (a resumed run's include those sent
    before its checkpoint).
    """
    key = "meta/datafree_blackbox"
    pool, learner = model_pool(tasks, key), module_of(model, key)
    counted = [CountedScores(h) for h in pool.handles]
    gen = torch.Generator().manual_seed(seed)
    oracle = zeroth_order_grad(cfg, gen)
    trained, history = datafree_train(
        counted, learner, pool.input_shape, cfg, oracle, gen, progress, key, ckpt
    )
    history.queries = sum(c.queries for c in counted)
    return MetaResult(trained, history, key)
