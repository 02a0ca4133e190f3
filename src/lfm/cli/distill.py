"""`lfm distill`: distillation from the command line, a thin layer over `lfm.distill.recipes`."""

from __future__ import annotations

from pathlib import Path

import typer

from lfm.cli.common import finite, group
from lfm.distill import recipes
from lfm.distill.vision import DATAFREE, METHODS

app = group("Model distillation: train a student from a teacher's outputs or features.")


@app.command()
def vision(
    method: str = typer.Option(
        "kd",
        help=f"student (no teacher), or a loss: {', '.join(list(METHODS)[1:])}, or any other logit loss",
    ),
    train_size: int = typer.Option(10_000, min=1, help="Fashion-MNIST training images used"),
    test_size: int = typer.Option(5_000, min=1, help="test images used"),
    teacher_steps: int = typer.Option(400, min=1, help="optimizer steps for the teacher"),
    student_steps: int = typer.Option(200, min=1, help="optimizer steps for the student"),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(3e-3, callback=finite, help="AdamW learning rate (> 0)"),
    seed: int = typer.Option(0),
    ckpt_every: int = typer.Option(0, min=0, help="checkpoint every N steps (0: at the end only)"),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
    resume: Path | None = typer.Option(None, help="a run directory to resume"),
) -> None:
    """Fashion-MNIST: train a CNN teacher, then a small CNN student with METHOD, into a run."""
    out = recipes.vision(
        method, train_size=train_size, test_size=test_size, teacher_steps=teacher_steps,
        student_steps=student_steps, batch_size=batch_size, lr=lr, seed=seed,
        ckpt_every=ckpt_every, root=root, resume=resume,
    )  # fmt: skip
    m = out.metrics
    typer.echo(f"{out.run}: teacher {100 * m['teacher_acc']:.2f}%, "
               f"student ({method}) {100 * m['student_acc']:.2f}%")  # fmt: skip


@app.command()
def lm(
    method: str = typer.Option("lm_student", help=f"one of: {', '.join(recipes.LM_METHODS)}"),
    model: str = typer.Option("smollm2-135m", help="teacher: an offline model name or a path"),
    every: int = typer.Option(3, min=1, help="keep one block in EVERY"),
    kd_weight: float = typer.Option(
        5.0, min=0.0, callback=finite, help="lm_student: weight of the KD term (0: LM loss only)"
    ),
    lm_weight: float = typer.Option(
        2.0, min=0.0, callback=finite, help="lm_student: weight of the LM loss"
    ),
    temperature: float = typer.Option(
        2.0, callback=finite, help="lm_student: KD temperature (> 0)"
    ),
    steps: int = typer.Option(40, min=1, help="optimizer steps"),
    block_size: int = typer.Option(64, min=2, help="tokens per training block"),
    batch_size: int = typer.Option(4, min=1, help="blocks per step"),
    lr: float = typer.Option(5e-4, callback=finite, help="AdamW learning rate (> 0)"),
    eval_blocks: int = typer.Option(16, min=1, help="held-out BBC blocks for perplexity"),
    seed: int = typer.Option(0),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
) -> None:
    """BBC News: a layer-dropped student of MODEL trained with METHOD, into a run."""
    out = recipes.lm(
        method, model=model, every=every, kd_weight=kd_weight, lm_weight=lm_weight,
        temperature=temperature, steps=steps, block_size=block_size, batch_size=batch_size, lr=lr,
        eval_blocks=eval_blocks, seed=seed, root=root,
    )  # fmt: skip
    m = out.metrics
    typer.echo(f"{out.run}: perplexity teacher {m['teacher_ppl']:.2f}, "
               f"student ({method}) {m['student_ppl']:.2f}")  # fmt: skip


@app.command()
def datafree(
    method: str = typer.Option("deep_inversion", help=f"one of: {', '.join(DATAFREE)}"),
    teacher_steps: int = typer.Option(
        400, min=1, help="optimizer steps for the Fashion-MNIST teacher"
    ),
    train_size: int = typer.Option(10_000, min=1, help="images the teacher is trained on"),
    test_size: int = typer.Option(5_000, min=1, help="test images used"),
    iterations: int = typer.Option(
        200, min=1, help="generator updates (deep_inversion: batches of images synthesised)"
    ),
    batch_size: int = typer.Option(64, min=2, help="generated images per update"),
    kd_steps: int = typer.Option(
        1000, min=1, help="deep_inversion: KD steps on the synthesised images"
    ),
    synthesis_steps: int = typer.Option(200, min=1, help="deep_inversion: pixel updates per batch"),
    competition: float = typer.Option(
        0.0, min=0.0, callback=finite, help="deep_inversion: α_c of Adaptive DeepInversion"
    ),
    seed: int = typer.Option(0),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
) -> None:
    """Fashion-MNIST: a CNN teacher, then a student that never sees data (METHOD), into a run."""
    out = recipes.datafree(
        method, teacher_steps=teacher_steps, train_size=train_size, test_size=test_size,
        iterations=iterations, batch_size=batch_size, kd_steps=kd_steps,
        synthesis_steps=synthesis_steps, competition=competition, seed=seed, root=root,
    )  # fmt: skip
    m = out.metrics
    typer.echo(f"{out.run}: teacher {100 * m['teacher_acc']:.2f}%, student ({method}) "
               f"{100 * m['student_acc']:.2f}%, {int(m['queries'])} teacher queries")  # fmt: skip
