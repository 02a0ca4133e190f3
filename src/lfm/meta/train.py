"""The outer loop every meta-learner from data shares, its registration, and meta-testing.

The outer loop of MAML (Finn et al. 2017, arXiv 1703.03400, Algorithm 1):

    θ ← θ − β ∇_θ Σ_{T_i ~ p(T)} L_{T_i}(f_{θ'_i})

run with Adam. `Checkpoints` saves the loop's state into a run directory every few meta-updates
and resumes from it: the parameters, Meta-SGD's step sizes, Adam's state, the step, the losses so
far and the task stream's generator, which is all the remaining updates depend on, so a resumed
run ends with exactly the weights of an uninterrupted one.

A method is registered with its objective `(model, params, tasks, problem, cfg, lrs, vectorize)
-> Outer` (a loss to differentiate, or, for Reptile, the update direction itself) and its
prediction function `(model, params, task, problem, cfg, lrs, train) -> Tensor` (adapt on
the support set, or prototypes); both are facts of the registry entry (`spec.extras`). Meta-test
looks the prediction function up by the method's name, adapts to each held-out task the way the
method does and reports mean ± 1.96·std/√n.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm, trange

from lfm.access import Access, module_of
from lfm.core import checkpoints, placement
from lfm.errors import LfmError
from lfm.meta.contract import LEARNER, History, MetaResult, ModelPool
from lfm.meta.functional import (
    OuterConfig,
    Params,
    Task,
    adapted_predict,
    can_vectorize,
    on,
    over_tasks,
    params_of,
    selected,
)
from lfm.registry import get, register

CHECKPOINT = checkpoints.CHECKPOINT  # the folder in a run directory holding the loop's state


class Outer(NamedTuple):
    """What one meta-batch gives the outer optimiser."""

    loss: Tensor  # the meta-loss (logged; differentiated when `grads` is None)
    grads: Params | None = None  # an explicit update direction per parameter (Reptile)


Objective = Callable[..., Outer]  # (model, params, tasks, problem, cfg, lrs, vectorize) -> Outer
Predict = Callable[..., Tensor]  # (model, params, task, problem, cfg, lrs, train) -> Tensor


def query_objective(
    model: nn.Module,
    params: Params,
    tasks: Task,
    problem: Any,
    cfg: Any,
    lrs: Params | None,
    vectorize: bool,
    predict: Predict = adapted_predict,
) -> Outer:
    """Mean query loss after each task's adaptation (MAML, FOMAML, ANIL, Meta-SGD, ProtoNets).

    `predict` gives a task's query predictions: `adapted_predict` for the MAML family,
    `proto_predict` for ProtoNets.
    """

    def one(task: Task) -> Tensor:
        return problem.loss(predict(model, params, task, problem, cfg, lrs, True), task.yq)

    return Outer(over_tasks(one, tasks, vectorize).mean())


def init_lrs(params: Params, cfg: Any) -> Params | None:
    """Meta-SGD's step sizes, one per adapted parameter entry, initialised to `inner_lr`."""
    if not getattr(cfg, "learn_inner_lr", False):
        return None
    names = selected(params, cfg.inner_params)
    return {n: torch.full_like(params[n], cfg.inner_lr).requires_grad_() for n in names}


def _set_grads(out: Outer, params: Params, lrs: Params | None) -> None:
    leaves = _leaves(params, lrs)
    if out.grads is not None:
        for n, p in params.items():
            p.grad = out.grads[n].detach().clone()
        return
    gs = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
    for p, g in zip(leaves.values(), gs, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g


class Checkpoints(checkpoints.Checkpoints):
    """Save the outer loop's state into `run/checkpoint/` every `every` meta-updates (and after
    the last), atomically; a loop given a run that holds one continues from it.

    Args:
        run: the run directory.
        every: meta-updates between checkpoints; 0: none.
    """

    def save(
        self, step: int, params: Params, lrs: Params | None, opt: Any, gen: Any, history: History
    ) -> None:
        """Write the state after meta-update `step` (replacing the previous checkpoint)."""
        self.write(step, _leaves(params, lrs), {"optimizer": opt}, loss=list(history.loss),
                   generator=gen.get_state())  # fmt: skip

    def load(self, params: Params, lrs: Params | None, opt: Any, gen: Any, history: History) -> int:
        """Restore the saved state in place; the step it was saved after (0: no checkpoint)."""
        state = self.read(_leaves(params, lrs), {"optimizer": opt})
        if state is None:
            return 0
        if state["tensors"]:
            raise LfmError(f"{self.folder} holds another model's state; resume it with its options")
        gen.set_state(state["generator"])
        history.loss[:] = [float(v) for v in state["loss"]]
        return int(state["step"])


def _leaves(params: Params, lrs: Params | None) -> Params:
    """The parameters and Meta-SGD's step sizes (as `lr:<name>`): what the outer loop changes."""
    return {**params, **{f"lr:{n}": t for n, t in (lrs or {}).items()}}


def outer_loop(
    model: nn.Module,
    sampler: Any,
    cfg: OuterConfig,
    objective: Objective,
    seed: int = 0,
    progress: bool = False,
    desc: str = "meta",
    ckpt: Checkpoints | None = None,
) -> tuple[nn.Module, History]:
    """Meta-train a copy of `model` by Adam on `objective` over meta-batches from `sampler`.

    Args:
        model: the network whose initialisation is meta-learned (not changed).
        sampler: gives `sample(n, generator) -> Task` and `problem`.
        cfg: the method's config (outer loop, and the inner loop its objective reads).
        objective: the method's `(model, params, tasks, problem, cfg, lrs, vectorize) -> Outer`.
        seed: seeds the task stream.
        progress: show a progress bar named `desc`.
        ckpt: save the state there at its interval, and continue from a checkpoint found there.
    """
    home, device = placement.device_of(model), placement.loop_device(model)
    model = copy.deepcopy(model).to(device)  # what the loop returns goes back to `home`
    params = params_of(model)
    lrs = init_lrs(params, cfg)
    opt = torch.optim.Adam([*params.values(), *(lrs or {}).values()], lr=cfg.outer_lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    vec = can_vectorize(model, cfg.vectorize)
    history = History()
    start = ckpt.load(params, lrs, opt, gen, history) if ckpt else 0
    bar = trange(start, cfg.steps, initial=start, total=cfg.steps, disable=not progress,
                 desc=desc, leave=False)  # fmt: skip
    for step in bar:
        tasks = on(sampler.sample(cfg.meta_batch, gen), device)
        with placement.autocast(device):  # `--dtype`: the forward passes; θ, ∇θ, Adam stay fp32
            out = objective(model, params, tasks, sampler.problem, cfg, lrs, vec)
        _set_grads(out, params, lrs)
        opt.step()
        history.loss.append(float(out.loss.detach()))
        if ckpt and ckpt.due(step + 1, cfg.steps):
            ckpt.save(step + 1, params, lrs, opt, gen, history)
    history.inner_lrs = {n: t.detach().to(home) for n, t in lrs.items()} if lrs else None
    return model.to(home), history


def task_source(tasks: Any, key: str) -> Any:
    """`tasks` if it is a task source (`sample(n, generator)` and `problem`), else an error."""
    if isinstance(tasks, ModelPool):
        raise LfmError(
            f"{key} learns from tasks (SinusoidTasks, EpisodeTasks), not from a ModelPool; "
            "meta-learn from a pool with meta/datafree_whitebox or meta/datafree_blackbox"
        )
    if not (hasattr(tasks, "sample") and hasattr(tasks, "problem")):
        raise LfmError(f"{key}: tasks must be a task source such as SinusoidTasks or EpisodeTasks")
    return tasks


def learner(key: str, objective: Objective) -> Callable[..., MetaResult]:
    """The learner registered as `key`: the outer loop over `objective`.

    Every learner from data is this one function; it is made per name only so that its result
    names the method (`MetaResult.method`) without reading anything off the config's class.
    """

    def learn(
        model: Any,
        tasks: Any,
        cfg: Any = None,
        *,
        seed: int = 0,
        progress: bool = False,
        ckpt: Checkpoints | None = None,
    ) -> MetaResult:
        """Meta-train a copy of `model` (a `LocalClassifier` or an `nn.Module`) on `tasks`.

        Args:
            model: the network whose initialisation is meta-learned; the caller's is not changed.
            tasks: a task source (`SinusoidTasks`, `EpisodeTasks`).
            cfg: the method's config (None: its defaults; a mapping is validated).
            seed: seeds the task stream.
            progress: show a progress bar.
            ckpt: checkpoint into a run directory, and resume from the checkpoint there.
        """
        sampler = task_source(tasks, key)
        trained, history = outer_loop(
            module_of(model, key), sampler, cfg, objective, seed, progress, desc=key, ckpt=ckpt
        )
        return MetaResult(trained, history, key)

    learn.__name__ = learn.__qualname__ = key.split("/")[-1]
    return learn


def register_learner(
    name: str, *, objective: Objective, predict: Predict, **kw: Any
) -> Callable[..., MetaResult]:
    """Register `meta/<name>`, a learner from data, with its objective and prediction function.

    Both are kept on the registry entry (`spec.extras`), where `meta_test` finds the prediction
    function by the method's name. `kw`: the rest of `lfm.registry.register`'s arguments.
    """
    fn = learner(f"meta/{name}", objective)
    return register(
        "meta", name, shape=LEARNER, access=Access.WEIGHTS, objective=objective, predict=predict,
        **kw,
    )(fn)  # fmt: skip


def summarise(scores: Tensor) -> dict[str, float]:
    """Mean and 95 % interval half-width 1.96·std/√n of per-task scores."""
    n = scores.numel()
    std = float(scores.std()) if n > 1 else 0.0
    return {"mean": float(scores.mean()), "ci95": 1.96 * std / math.sqrt(n), "n": n}


def meta_test(
    learned: MetaResult | Any,
    tasks: Any,
    method: str | None = None,
    cfg: Any = None,
    *,
    n_tasks: int = 600,
    seed: int = 12345,
    inner_lrs: Params | None = None,
    chunk: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Adapt to `n_tasks` held-out tasks the way `method` does and score their queries.

    Tasks are drawn and adapted `chunk` at a time (one `vmap` call each); the draws do not depend
    on `chunk`, which only bounds memory (100 episodes of 28×28 images under one `vmap` allocate
    hundreds of MB per layer, and the allocator's page faults then cost more than the maths).

    Args:
        learned: a `MetaResult` (its model, method and learned step sizes are used), or a model
            (`nn.Module` or `LocalClassifier`) with `method` named.
        tasks: the held-out task source.
        method: the registered meta method whose adaptation to use (`maml`, `protonets` ...);
            its registry entry gives the prediction function. Default: the result's method.
        cfg: that method's config (its inner loop at meta-test); None: its defaults.
        n_tasks: held-out tasks.
        seed: seeds the held-out draws.
        inner_lrs: Meta-SGD's step sizes; default: the result's.
        chunk: tasks adapted per `vmap` call.
        progress: show a progress bar over the tasks.

    Returns:
        `{"mean", "ci95", "n", "metric"}`.
    """
    model = learned
    if isinstance(learned, MetaResult):
        model, method = learned.model, method or learned.method
        inner_lrs = learned.history.inner_lrs if inner_lrs is None else inner_lrs
    if method is None:
        raise LfmError("meta_test needs the method whose adaptation to use (or a MetaResult)")
    spec = get(method, area="meta")
    cfg, predict = spec.resolve(cfg), spec.extras["predict"]
    model = module_of(model, "meta_test")
    device = placement.loop_device(model)
    model = model if device == placement.device_of(model) else copy.deepcopy(model).to(device)
    params = {n: p.detach() for n, p in params_of(model).items()}
    if inner_lrs is not None:
        inner_lrs = {n: t.to(device) for n, t in inner_lrs.items()}
    gen = torch.Generator().manual_seed(seed)
    vec = can_vectorize(model, cfg.vectorize)
    problem, scores = tasks.problem, []

    def one(task: Task) -> Tensor:
        return problem.metric(predict(model, params, task, problem, cfg, inner_lrs, False), task.yq)

    with tqdm(total=n_tasks, desc="meta-test", disable=not progress, leave=False) as bar:
        for start in range(0, n_tasks, chunk):
            batch = on(tasks.sample(min(chunk, n_tasks - start), gen), device)
            with placement.autocast(device):
                scores.append(over_tasks(one, batch, vec).detach().float().cpu())
            bar.update(len(scores[-1]))
    return {**summarise(torch.cat(scores)), "metric": problem.metric_name}
