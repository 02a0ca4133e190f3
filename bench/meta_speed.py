"""Meta-iterations per second of second-order MAML: ours (vmap and loop), `higher`, learn2learn.

Two jobs of MAML (Finn et al. 2017, arXiv 1703.03400), one inner SGD step, second order, Adam on
the meta-gradient; each meta-iteration samples its tasks, adapts, and steps:

- `sinusoid` (Sec. 5.1): the 40-40 ReLU MLP, 5-shot support and 10 queries, meta-batch 25,
  α = 0.01.
- `convnet` (Sec. 5.2, Omniglot 5-way 1-shot): the 4-block ConvNet (`--width` filters, batch-
  statistics BatchNorm) on 28×28 inputs, one query per class, meta-batch 32, α = 0.4. Images
  are random: speed does not depend on what they show.

Before timing, every implementation computes the meta-gradient of one meta-batch from the same
initialisation; the largest absolute difference from ours (vmap) is printed. Timing repeats
`--repeats` rounds, the implementations interleaved within a round, `--iters` meta-iterations
each after a warm-up; the table gives the median meta-iterations per second and the median
ratio of ours (vmap) to each implementation over the rounds, per second of this process's CPU
time (one thread, so robust to other jobs on a shared machine) and per wall-clock second.

Peers, each imported from outside the project's environment, so nothing is installed into it:

- `higher` 0.2.1 (Grefenstette et al. 2019, arXiv 1910.01727), a pure-Python wheel, imported
  from the wheel file itself:

      pip download --no-deps higher==0.2.1 -d /tmp/peers

- learn2learn 0.2.0 (Arnold et al. 2020, arXiv 2008.12284) publishes only an sdist (its Cython
  parts predate Python 3.11), and `import learn2learn` also imports its vision and gym
  subpackages, which need torchvision, whose PyPI wheel for torch 2.13 is a CUDA build that does
  not load beside the CPU torch. Its MAML is plain Python, so the bench loads `algorithms/maml.py`
  (with `algorithms/base_learner.py` and `utils`, all it imports) from the unpacked source
  without running the package's `__init__` or building anything; the MAML code that runs is
  learn2learn's own, on this environment's torch:

      pip download --no-deps --no-binary learn2learn learn2learn==0.2.0 -d /tmp/peers
      mkdir -p /tmp/peers/l2l-site && tar xzf /tmp/peers/learn2learn-0.2.0.tar.gz -C /tmp/peers
      cp -r /tmp/peers/learn2learn-0.2.0/learn2learn /tmp/peers/l2l-site/

    python bench/meta_speed.py --higher-wheel /tmp/peers/higher-0.2.1-py3-none-any.whl \\
        --l2l-site /tmp/peers/l2l-site
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lfm.meta import MLP, MAMLConfig, SinusoidTasks, maml
from lfm.meta.functional import Task, params_of
from lfm.meta.models import ConvNet
from lfm.meta.tasks import EpisodeTasks
from lfm.meta.train import query_objective

JOBS = {
    "sinusoid": {"batch": 25, "alpha": 0.01, "iters": 20},
    "convnet": {"batch": 32, "alpha": 0.4, "iters": 3},
}


def make_job(job: str, width: int) -> tuple[Callable[[], nn.Module], object]:
    """A model factory (seeded) and a task sampler for `job`."""
    if job == "sinusoid":
        return lambda: MLP(1, 1, (40, 40)), SinusoidTasks(5, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20 * 2, 1, 28, 28, generator=gen)  # 20 classes, 2 images each
    y = torch.arange(20).repeat_interleave(2)
    return lambda: ConvNet(5, width, 4, 28), EpisodeTasks(x, y, range(20), 5, 1, 1)


def load_l2l_maml(site: str) -> type:
    """learn2learn's `MAML` class from `site`, without running `learn2learn/__init__.py`."""
    root = Path(site) / "learn2learn"
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", root / "algorithms")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def ours(model, sampler, cfg: MAMLConfig, steps: int, vectorize: str) -> None:
    maml(model, sampler, cfg.replace(steps=steps, vectorize=vectorize))


def peer_step(adapt, model, sampler, cfg, opt, gen) -> None:
    """One meta-iteration the way the peers' examples write it: a loop over tasks."""
    xs, ys, xq, yq = sampler.sample(cfg.meta_batch, gen)
    loss = sampler.problem.loss
    opt.zero_grad()
    for i in range(cfg.meta_batch):
        (adapt(xs[i], ys[i], xq[i], yq[i], loss) / cfg.meta_batch).backward()
    opt.step()


def higher_adapt(model, alpha: float):
    import higher

    inner = torch.optim.SGD(model.parameters(), lr=alpha)

    def adapt(xs, ys, xq, yq, loss):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fm, diffopt):
            diffopt.step(loss(fm(xs), ys))
            return loss(fm(xq), yq)

    return adapt


def l2l_adapt(maml):
    def adapt(xs, ys, xq, yq, loss):
        learner = maml.clone()
        learner.adapt(loss(learner(xs), ys))
        return loss(learner(xq), yq)

    return adapt


def peer_runner(kind: str, args) -> Callable:
    """`run(model, sampler, cfg, steps)` for a peer: builds its optimisers, then iterates."""

    def run(model, sampler, cfg, steps):
        gen = torch.Generator().manual_seed(0)
        if kind == "higher":
            adapt, params = higher_adapt(model, cfg.inner_lr), model.parameters()
        else:
            maml = args.l2l_maml(model, lr=cfg.inner_lr, first_order=False)
            adapt, params = l2l_adapt(maml), maml.parameters()
        opt = torch.optim.Adam(params, lr=cfg.outer_lr)
        for _ in range(steps):
            peer_step(adapt, model, sampler, cfg, opt, gen)

    return run


def meta_gradient(kind: str, model, tasks: Task, problem, cfg, args) -> list[torch.Tensor]:
    """∇_θ of the mean post-adaptation query loss on `tasks`, by implementation `kind`."""
    if kind.startswith("lfm"):
        params = params_of(model)
        out = query_objective(model, params, tasks, problem, cfg, None, kind == "lfm vmap")
        return list(torch.autograd.grad(out.loss, list(params.values())))
    model.zero_grad()
    if kind == "higher":
        adapt = higher_adapt(model, cfg.inner_lr)
    else:
        adapt = l2l_adapt(args.l2l_maml(model, lr=cfg.inner_lr, first_order=False))
    n = tasks.xs.shape[0]
    for i in range(n):
        (adapt(tasks.xs[i], tasks.ys[i], tasks.xq[i], tasks.yq[i], problem.loss) / n).backward()
    return [p.grad.clone() for p in model.parameters()]


def runners(args) -> dict[str, Callable]:
    out = {
        "lfm vmap": lambda m, s, c, n: ours(m, s, c, n, "always"),
        "lfm loop": lambda m, s, c, n: ours(m, s, c, n, "never"),
    }
    if args.higher_wheel:
        out["higher 0.2.1"] = peer_runner("higher", args)
    if args.l2l_site:
        out["learn2learn 0.2.0"] = peer_runner("l2l", args)
    return out


def check_gradients(job: str, make, sampler, cfg, names: list[str], args) -> None:
    tasks = sampler.sample(cfg.meta_batch, torch.Generator().manual_seed(1))
    grads = {}
    for name in names:
        torch.manual_seed(0)
        kind = {"higher 0.2.1": "higher", "learn2learn 0.2.0": "l2l"}.get(name, name)
        grads[name] = meta_gradient(kind, make(), tasks, sampler.problem, cfg, args)
    ref = grads["lfm vmap"]
    scale = max(g.abs().max().item() for g in ref)
    for name, gs in grads.items():
        diff = max((a - b).abs().max().item() for a, b in zip(gs, ref, strict=True))
        print(f"{job}: meta-gradient max |{name} − lfm vmap| = {diff:.2e} (max |g| {scale:.2e})")


def time_job(job: str, args) -> None:
    spec = JOBS[job]
    make, sampler = make_job(job, args.width)
    cfg = MAMLConfig(inner_lr=spec["alpha"], meta_batch=spec["batch"])
    impls = runners(args)
    check_gradients(job, make, sampler, cfg, list(impls), args)
    iters = args.iters or spec["iters"]
    rates: dict[str, list[float]] = {name: [] for name in impls}  # per CPU second
    walls: dict[str, list[float]] = {name: [] for name in impls}  # per wall second
    for run in impls.values():  # warm-up
        torch.manual_seed(0)
        run(make(), sampler, cfg, 1)
    for _ in range(args.repeats):
        for name, run in impls.items():
            torch.manual_seed(0)
            model = make()
            start, cpu = time.perf_counter(), time.process_time()
            run(model, sampler, cfg, iters)
            rates[name].append(iters / (time.process_time() - cpu))
            walls[name].append(iters / (time.perf_counter() - start))
    print(f"\n{job}: {iters} meta-iterations × {args.repeats} rounds, median (min–max)")
    print("| implementation | per CPU second | ratio | per wall second | ratio |")
    print("|---|---|---|---|---|")
    for name in impls:
        cells = []
        for table in (rates, walls):
            r, base = table[name], table["lfm vmap"]
            ratio = statistics.median(b / x for b, x in zip(base, r, strict=True))
            cells.append(f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f}) | {ratio:.1f}")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", nargs="+", choices=tuple(JOBS), default=list(JOBS))
    p.add_argument("--iters", type=int, default=0, help="meta-iterations per round (0: per job)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--width", type=int, default=32, help="ConvNet filters (MAML Omniglot: 64)")
    p.add_argument("--higher-wheel", default=None, help="path of a `higher` wheel to import")
    p.add_argument("--l2l-site", default=None, help="a folder holding learn2learn/ (its source)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.higher_wheel:
        sys.path.insert(0, args.higher_wheel)
    args.l2l_maml = load_l2l_maml(args.l2l_site) if args.l2l_site else None
    for job in args.jobs:
        time_job(job, args)


if __name__ == "__main__":
    main()
