"""Meta-iterations per second of one MAML job, ours (vmap and loop) beside the `higher` library.

The job is MAML's sinusoid set-up (Finn et al. 2017, arXiv 1703.03400, Sec. 5.1): the 40-40
ReLU MLP, 5-shot support and 10 queries, meta-batch 25, one second-order inner SGD step at
α = 0.01, Adam 1e-3 on the meta-gradient. Each meta-iteration samples the tasks, adapts, and steps.

`higher` (Grefenstette et al. 2019, arXiv 1910.01727) is imported from a wheel path given with
`--higher-wheel` (a wheel is a zip that Python imports from directly), so nothing is installed:

    pip download --no-deps higher -d /tmp/peers
    python bench/meta_speed.py --higher-wheel /tmp/peers/higher-0.2.1-py3-none-any.whl

learn2learn publishes no wheel for Python 3.11, so it is not compared.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from lfm.meta import MLP, MAMLConfig, SinusoidTasks, meta_train


def ours(steps: int, vectorize: str) -> float:
    """Seconds for `steps` meta-iterations of `meta_train`."""
    torch.manual_seed(0)
    cfg = MAMLConfig(steps=steps, vectorize=vectorize)
    start = time.perf_counter()
    meta_train(MLP(1, 1, (40, 40)), SinusoidTasks(5, 10), cfg)
    return time.perf_counter() - start


def with_higher(steps: int) -> float:
    """Seconds for `steps` meta-iterations written with `higher.innerloop_ctx`."""
    import higher

    torch.manual_seed(0)
    model, sampler = MLP(1, 1, (40, 40)), SinusoidTasks(5, 10)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        xs, ys, xq, yq = sampler.sample(25, gen)
        outer.zero_grad()
        for i in range(25):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fm, opt):
                opt.step(F.mse_loss(fm(xs[i]), ys[i]))
                (F.mse_loss(fm(xq[i]), yq[i]) / 25).backward()
        outer.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=100, help="timed meta-iterations per variant")
    p.add_argument("--higher-wheel", default=None, help="path of a `higher` wheel to import")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"lfm vmap": lambda n: ours(n, "always"), "lfm loop": lambda n: ours(n, "never")}
    if args.higher_wheel:
        sys.path.insert(0, args.higher_wheel)
        variants["higher 0.2.1"] = with_higher
    print("| implementation | meta-iterations / s |\n|---|---|")
    for name, fn in variants.items():
        fn(5)  # warm-up
        print(f"| {name} | {args.steps / fn(args.steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
