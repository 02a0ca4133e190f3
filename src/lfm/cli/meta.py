"""`lfm meta`: meta-train a MAML-family learner, Reptile or ProtoNets and meta-test it, or
meta-learn without data from a pool of pretrained classifiers.

    lfm meta train --method maml --task sinusoid --shots 5 --steps 2000
    lfm meta datafree --access scores --shots 1 --steps 100 --pool 4

write runs/<stamp>-meta-<method>/ with the manifest (resolved config, metrics) and the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    help="Meta learning: MAML, FOMAML, ANIL, Meta-SGD, Reptile, ProtoNets; data-free from a pool."
)

TASKS = ("sinusoid", "digits", "fashion-mnist")
SIZES = {"digits": 8, "fashion-mnist": 28}


@app.callback()
def meta() -> None:
    """Meta learning from data (keeps `train` a subcommand when this app runs alone)."""


def build_problem(
    task: str, shots: int, ways: int, meta_learner: bool, seed: int
) -> tuple[Any, Any, Any]:
    """(model, meta-train sampler, meta-test sampler) for a task family."""
    import torch

    from lfm.meta import MLP, SinusoidTasks, rotated_digit_splits
    from lfm.meta.models import ConvNet

    torch.manual_seed(seed)
    if task == "sinusoid":
        return MLP(1, 1, (40, 40)), SinusoidTasks(shots, 10), SinusoidTasks(shots, 100)
    if task in SIZES:
        train, _, test = rotated_digit_splits(
            task, seed=seed, per_class=300, ways=ways, shots=shots, queries=5
        )
        return ConvNet(ways if meta_learner else 64, 32, 4, SIZES[task]), train, test
    raise typer.BadParameter(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


@app.command()
def train(
    method: str = typer.Option(
        "maml", help="maml, fomaml, anil, metasgd, reptile, protonets, pretrain"
    ),
    task: str = typer.Option("sinusoid", help="sinusoid, digits or fashion-mnist (rotated N-way)"),
    shots: int = typer.Option(5, help="K support examples (per class for digits)"),
    ways: int = typer.Option(5, help="N classes per episode (digits)"),
    steps: int = typer.Option(1000, help="meta-updates"),
    meta_batch: int = typer.Option(0, help="tasks per meta-update; 0 keeps the method's default"),
    test_tasks: int = typer.Option(600, help="held-out tasks for meta-test"),
    config: Path = typer.Option(None, help="YAML/JSON config file (overridden by the options)"),
    seed: int = typer.Option(0, help="seed of the model and the task stream"),
    out: Path = typer.Option(Path("runs"), help="where run directories are created"),
) -> None:
    """Meta-train, meta-test on held-out tasks, and write a run directory."""
    import torch

    from lfm.meta import MetaConfig, meta_test, meta_train
    from lfm.registry import get
    from lfm.runs import Run

    spec = get(f"meta/{method}")
    is_maml = issubclass(spec.config, MetaConfig)
    preset = {"inner_lr": 0.4, "test_inner_steps": 3} if task in SIZES and is_maml else {}
    base = spec.config.load(config).to_dict() if config else {}
    cfg = spec.config.build(
        {**base, **preset}, steps=steps, **({"meta_batch": meta_batch} if meta_batch else {})
    )
    model, train_tasks, test_tasks_sampler = build_problem(task, shots, ways, is_maml, seed)
    with Run(f"meta-{method}", cfg, root=out) as run:
        run.manifest["task"] = {"name": task, "shots": shots, "ways": ways, "seed": seed}
        trained, hist = meta_train(model, train_tasks, cfg, seed=seed, progress=True)
        score = meta_test(
            trained, test_tasks_sampler, cfg, n_tasks=test_tasks, inner_lrs=hist.inner_lrs
        )
        run.log(
            final_meta_loss=hist.loss[-1] if hist.loss else None,
            **{f"test_{k}": v for k, v in score.items()},
        )
        with run.output("model.pt") as tmp:
            torch.save({"state_dict": trained.state_dict(), "inner_lrs": hist.inner_lrs}, tmp)
    typer.echo(
        f"{spec.key} {task} {shots}-shot: {score['metric']} {score['mean']:.4f} ± {score['ci95']:.4f} -> {run.path}"
    )


@app.command()
def datafree(
    access: str = typer.Option("weights", help="weights (PURER-like) or scores (BiDf-MKD-like)"),
    task: str = typer.Option("digits", help="digits or fashion-mnist (rotated 5-way)"),
    shots: int = typer.Option(1, help="K support examples per class at meta-test"),
    pool: int = typer.Option(4, help="pretrained 5-way pool models"),
    pool_steps: int = typer.Option(150, help="Adam steps per pool model"),
    steps: int = typer.Option(100, help="data-free meta-updates"),
    test_tasks: int = typer.Option(600, help="held-out episodes for meta-test"),
    config: Path = typer.Option(None, help="YAML/JSON config file (overridden by the options)"),
    seed: int = typer.Option(0, help="seed of the pool, the learner and the episodes"),
    out: Path = typer.Option(Path("runs"), help="where run directories are created"),
) -> None:
    """Train a pool of classifiers, meta-learn from them without their data, meta-test."""
    import torch

    from lfm.access import LocalClassifier, narrow
    from lfm.meta import meta_test, rotated_digit_splits
    from lfm.meta.baseline import train_pool
    from lfm.meta.models import ConvNet
    from lfm.meta.protonets import ProtoNetsConfig
    from lfm.registry import get
    from lfm.runs import Run

    if task not in SIZES or access not in ("weights", "scores"):
        raise typer.BadParameter("--task digits|fashion-mnist, --access weights|scores")
    spec = get("meta/datafree-" + ("whitebox" if access == "weights" else "blackbox"))
    base = spec.config.load(config).to_dict() if config else {}
    cfg = spec.config.build(base, steps=steps)
    size = SIZES[task]
    train, _, test = rotated_digit_splits(
        task, seed=seed, per_class=300, ways=5, shots=shots, queries=5
    )
    with Run(spec.key.replace("/", "-"), cfg, root=out) as run:
        run.manifest["task"] = {"name": task, "shots": shots, "pool": pool, "seed": seed}
        make = lambda: ConvNet(5, 16, 4, size, running=True)  # noqa: E731
        models = train_pool(train, make, n_models=pool, ways=5, steps=pool_steps, seed=seed)
        handles = [narrow(LocalClassifier(m), access) for m in models]
        torch.manual_seed(seed)
        shape = tuple(train.pools[0].shape[1:])
        learner, hist = spec.fn(handles, ConvNet(64, 32, 4, size), shape, cfg, seed)
        score = meta_test(learner, test, ProtoNetsConfig(), n_tasks=test_tasks)
        run.log(
            final_meta_loss=hist.loss[-1] if hist.loss else None,
            pool_queries=getattr(hist, "queries", None),
            **{f"test_{k}": v for k, v in score.items()},
        )
        with run.output("model.pt") as tmp:
            torch.save({"state_dict": learner.state_dict()}, tmp)
    typer.echo(
        f"{spec.key} {task} {shots}-shot: accuracy {score['mean']:.4f} ± {score['ci95']:.4f} -> {run.path}"
    )
