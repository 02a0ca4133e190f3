"""`lfm meta`: meta-train a MAML-family learner, Reptile or ProtoNets and meta-test it, or
meta-learn without data from a pool of pretrained classifiers (`lfm.meta.recipes`).

    lfm meta train --method maml --task sinusoid --shots 5 --steps 2000
    lfm meta train --method protonets --data chars/ --ways 5 --shots 1 --steps 300
    lfm meta datafree --method datafree_blackbox --shots 1 --steps 100 --pool 4

write runs/<stamp>-meta-<method>/ (under --root) with the manifest (resolved config, metrics, the
meta-loss history), curves.png and model.safetensors; `--resume RUN` continues a run from its
checkpoint (`--ckpt-every N`). `--device` runs the loops there (the models, the tasks of each
meta-batch, the pool); `--dtype bfloat16` autocasts their forward passes while the parameters,
the meta-gradients and Adam's state stay float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lfm.cli.common import Threads, finite, group, use_threads

app = group(
    "Meta learning: MAML, FOMAML, ANIL, Meta-SGD, Reptile, ProtoNets; data-free from a pool."
)

Root = Annotated[Path, typer.Option(help="where run directories are created")]
Config = Annotated[
    Path | None, typer.Option(help="YAML/JSON config file (overridden by the options)")
]


@app.callback()
def meta() -> None:
    """Meta learning from data (keeps `train` a subcommand when this app runs alone)."""


def _line(done, task: str, shots: int) -> str:
    s = done.score
    return (
        f"{done.method} {task} {shots}-shot: {s['metric']} {s['mean']:.4f} ± {s['ci95']:.4f}"
        f" -> {done.path}"
    )


@app.command(placed="train")
def train(
    method: str = typer.Option(
        "maml", help="maml, fomaml, anil, metasgd, reptile, protonets or pretrain"
    ),
    task: str = typer.Option(
        None, help="sinusoid (the default), digits or fashion-mnist (rotated N-way)"
    ),
    data: Path = typer.Option(
        None,
        help="your own task folder instead of --task: DIR/<class>/<images>, or "
        "DIR/train/<class>/... and DIR/test/<class>/...",
    ),
    image_size: int = typer.Option(28, min=1, help="--data images are resized to this side"),
    test_classes: float = typer.Option(
        0.2,
        callback=finite,
        help="--data without train/ and test/: classes held out for "
        "meta-test, a fraction in (0, 1) or a count",
    ),
    shots: int = typer.Option(5, help="K support examples (per class on images)"),
    ways: int = typer.Option(5, min=1, help="N classes per episode (images)"),
    steps: int = typer.Option(1000, help="meta-updates (0: meta-test the initialisation)"),
    meta_batch: int = typer.Option(
        0, min=0, help="tasks per meta-update; 0 keeps the method's default"
    ),
    test_tasks: int = typer.Option(600, min=1, help="held-out tasks for meta-test"),
    config: Config = None,
    seed: int = typer.Option(0, help="seed of the model, the class split and the task stream"),
    threads: Threads = 2,
    root: Root = Path("runs"),
    resume: Path = typer.Option(None, help="a run directory to continue (same options)"),
    ckpt_every: int = typer.Option(
        100, min=0, help="checkpoint every N meta-updates and after the last (0: never)"
    ),
) -> None:
    """Meta-train, meta-test on held-out tasks, and write a run directory."""
    from lfm.meta import recipes

    use_threads(threads)
    done = recipes.train(
        method, task, data=data, image_size=image_size, test_classes=test_classes, shots=shots,
        ways=ways, steps=steps, meta_batch=meta_batch, test_tasks=test_tasks, config=config,
        seed=seed, root=root, resume=resume, ckpt_every=ckpt_every, progress=True,
    )  # fmt: skip
    name = f"{data} {ways}-way" if data is not None else (task or "sinusoid")
    typer.echo(_line(done, name, shots))


@app.command(placed="train")
def datafree(
    method: str = typer.Option(
        "datafree_whitebox", help="datafree_whitebox (PURER-like) or datafree_blackbox (BiDf-MKD)"
    ),
    task: str = typer.Option("digits", help="digits or fashion-mnist (rotated 5-way)"),
    shots: int = typer.Option(1, help="K support examples per class at meta-test"),
    pool: int = typer.Option(4, help="pretrained 5-way pool models"),
    pool_steps: int = typer.Option(150, min=1, help="Adam steps per pool model"),
    steps: int = typer.Option(100, help="data-free meta-updates (0: meta-test only)"),
    test_tasks: int = typer.Option(600, min=1, help="held-out episodes for meta-test"),
    config: Config = None,
    seed: int = typer.Option(0, help="seed of the pool, the learner and the episodes"),
    threads: Threads = 2,
    root: Root = Path("runs"),
    resume: Path = typer.Option(None, help="a run directory to continue (same options)"),
    ckpt_every: int = typer.Option(
        100, min=0, help="checkpoint every N meta-updates and after the last (0: never)"
    ),
) -> None:
    """Train a pool of classifiers, meta-learn from them without their data, meta-test."""
    from lfm.meta import recipes

    use_threads(threads)
    done = recipes.datafree(
        method, task, shots=shots, pool=pool, pool_steps=pool_steps, steps=steps,
        test_tasks=test_tasks, config=config, seed=seed, root=root, resume=resume,
        ckpt_every=ckpt_every, progress=True,
    )  # fmt: skip
    queries = done.result.history.queries
    typer.echo(_line(done, task, shots) + (f" ({queries} pool queries)" if queries else ""))
