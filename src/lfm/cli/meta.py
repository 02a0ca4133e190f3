"""`lfm meta`: meta-train a MAML-family learner, Reptile or ProtoNets and meta-test it.

    lfm meta train --method maml --task sinusoid --shots 5 --steps 2000

writes runs/<stamp>-meta-<method>/ with the manifest (resolved config, metrics) and the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Meta learning from data: MAML, FOMAML, ANIL, Meta-SGD, Reptile, ProtoNets.")

TASKS = ("sinusoid", "digits")


@app.callback()
def meta() -> None:
    """Meta learning from data (keeps `train` a subcommand when this app runs alone)."""


def build_problem(
    task: str, shots: int, ways: int, meta_learner: bool, seed: int
) -> tuple[Any, Any, Any]:
    """(model, meta-train sampler, meta-test sampler) for a task family."""
    import torch

    from lfm.meta import MLP, SinusoidTasks, rotated_digit_splits

    torch.manual_seed(seed)
    if task == "sinusoid":
        return MLP(1, 1, (40, 40)), SinusoidTasks(shots, 10), SinusoidTasks(shots, 100)
    if task == "digits":
        train, _, test = rotated_digit_splits(seed=seed, ways=ways, shots=shots, queries=5)
        return MLP(64, ways if meta_learner else 64, (64, 64), image=True), train, test
    raise typer.BadParameter(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


@app.command()
def train(
    method: str = typer.Option(
        "maml", help="maml, fomaml, anil, metasgd, reptile, protonets, pretrain"
    ),
    task: str = typer.Option("sinusoid", help="sinusoid or digits (rotated 5-way)"),
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
    preset = {"inner_lr": 0.4, "test_inner_steps": 3} if task == "digits" and is_maml else {}
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
