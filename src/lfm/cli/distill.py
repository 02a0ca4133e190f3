"""`lfm distill`: distillation from the command line, a thin layer over `lfm.distill`."""

from __future__ import annotations

from pathlib import Path

import typer
from safetensors.torch import save_model

from lfm.core.train import TrainConfig
from lfm.distill.vision import (
    METHODS,
    accuracy,
    load_fashion_mnist,
    subsample,
    train_student,
    train_teacher,
)
from lfm.runs import Run

app = typer.Typer(help="Model distillation: train a student from a teacher's outputs or features.")


@app.command()
def vision(
    method: str = typer.Option("kd", help=f"one of: {', '.join(METHODS)}"),
    train_size: int = typer.Option(10_000, help="Fashion-MNIST training images used"),
    test_size: int = typer.Option(5_000, help="test images used"),
    teacher_steps: int = typer.Option(400, help="optimizer steps for the teacher"),
    student_steps: int = typer.Option(200, help="optimizer steps for the student"),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(3e-3, help="AdamW learning rate"),
    seed: int = typer.Option(0),
    ckpt_every: int = typer.Option(0, help="checkpoint every N steps (0: at the end only)"),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
    resume: Path | None = typer.Option(None, help="a run directory to resume"),
) -> None:
    """Fashion-MNIST: train a CNN teacher, then a small CNN student with METHOD, into a run."""
    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    # `resume` says where, not what: it stays out of the config a resumed run must match
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "resume"}
    data = subsample(load_fashion_mnist(), train_size, test_size)
    cfg = TrainConfig(lr=lr, seed=seed, ckpt_every=ckpt_every or 10**9)
    with Run(f"distill-{method}", config, root=root, path=resume) as run:
        t_run = Run("teacher", path=run.path / "teacher")
        teacher = train_teacher(data, cfg.replace(steps=teacher_steps), batch_size, t_run)
        s_run = Run("student", path=run.path / "student")
        student = train_student(
            method, teacher, data, cfg.replace(steps=student_steps), batch_size, s_run
        )
        for name, model in (("teacher", teacher), ("student", student)):
            with run.output(f"{name}.safetensors") as tmp:
                save_model(model, str(tmp))
        accs = {
            f"{n}_acc": accuracy(m, data.x_test, data.y_test)
            for n, m in (("teacher", teacher), ("student", student))
        }
        run.log(**accs)
    typer.echo(
        f"{run.path}: teacher {100 * accs['teacher_acc']:.2f}%, student ({method}) {100 * accs['student_acc']:.2f}%"
    )
