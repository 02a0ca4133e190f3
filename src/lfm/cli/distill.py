"""`lfm distill`: distillation from the command line, a thin layer over `lfm.distill`."""

from __future__ import annotations

from pathlib import Path

import typer
from safetensors.torch import save_model

from lfm.core.train import TrainConfig
from lfm.distill.vision import (
    DATAFREE,
    METHODS,
    accuracy,
    load_fashion_mnist,
    subsample,
    train_datafree,
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
    config = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "resume"
    }
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


@app.command()
def lm(
    model: str = typer.Option("smollm2-135m", help="teacher: an offline model name or a path"),
    every: int = typer.Option(3, help="keep one block in EVERY"),
    kd_weight: float = typer.Option(5.0, help="weight of the KD term (0: LM loss only)"),
    lm_weight: float = typer.Option(2.0, help="weight of the LM loss"),
    temperature: float = typer.Option(2.0, help="KD temperature"),
    steps: int = typer.Option(40, help="optimizer steps"),
    block_size: int = typer.Option(64, help="tokens per training block"),
    batch_size: int = typer.Option(4, help="blocks per step"),
    lr: float = typer.Option(5e-4, help="AdamW learning rate"),
    eval_blocks: int = typer.Option(16, help="held-out BBC blocks for perplexity"),
    seed: int = typer.Option(0),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
) -> None:
    """BBC News: a layer-dropped student of MODEL trained with KD + LM loss, into a run."""
    from lfm.assets import load_dataset, load_model
    from lfm.distill.lm import LMStudentConfig, distill_lm, perplexity, token_blocks

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    teacher = load_model(model)
    data = load_dataset("bbc-news")
    cfg = LMStudentConfig(every=every, kd_weight=kd_weight, lm_weight=lm_weight,
                          temperature=temperature, block_size=block_size, batch_size=batch_size)  # fmt: skip
    train_blocks = token_blocks(teacher.tokenizer, data.train_texts, block_size, steps * batch_size)
    test_blocks = token_blocks(teacher.tokenizer, data.test_texts, block_size, eval_blocks)
    with Run(f"distill-lm-{every}", config, root=root) as run:
        student, _ = distill_lm(teacher, train_blocks, cfg,
                                TrainConfig(steps=steps, lr=lr, seed=seed, progress=False), run=run)  # fmt: skip
        with run.output("student") as tmp:
            student.save_pretrained(tmp)
            teacher.tokenizer.save_pretrained(tmp)
        ppl = {"teacher_ppl": perplexity(teacher.model, test_blocks),
               "student_ppl": perplexity(student, test_blocks)}  # fmt: skip
        run.log(**ppl)
    typer.echo(
        f"{run.path}: perplexity teacher {ppl['teacher_ppl']:.2f}, student {ppl['student_ppl']:.2f}"
    )


@app.command()
def datafree(
    method: str = typer.Option("deepinversion", help=f"one of: {', '.join(DATAFREE)}"),
    teacher_steps: int = typer.Option(400, help="optimizer steps for the Fashion-MNIST teacher"),
    train_size: int = typer.Option(10_000, help="images the teacher is trained on"),
    test_size: int = typer.Option(5_000, help="test images used"),
    iterations: int = typer.Option(
        200, help="generator updates (deepinversion: batches of images synthesised)"
    ),
    batch_size: int = typer.Option(64, help="generated images per update"),
    kd_steps: int = typer.Option(1000, help="deepinversion: KD steps on the synthesised images"),
    synthesis_steps: int = typer.Option(200, help="deepinversion: pixel updates per batch"),
    competition: float = typer.Option(0.0, help="deepinversion: α_c of Adaptive DeepInversion"),
    seed: int = typer.Option(0),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
) -> None:
    """Fashion-MNIST: a CNN teacher, then a student that never sees data (METHOD), into a run."""
    if method not in DATAFREE:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(DATAFREE)}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    data = subsample(load_fashion_mnist(), train_size, test_size)
    extra = (
        {"kd_steps": kd_steps, "steps": synthesis_steps, "competition_weight": competition}
        if method == "deepinversion"
        else {}
    )
    with Run(f"distill-{method}", config, root=root) as run:
        cfg = TrainConfig(steps=teacher_steps, lr=3e-3, seed=seed, progress=False)
        teacher = train_teacher(data, cfg, 64)
        student, queries = train_datafree(method, teacher, iterations, batch_size, seed, **extra)
        for name, m in (("teacher", teacher), ("student", student)):
            with run.output(f"{name}.safetensors") as tmp:
                save_model(m, str(tmp))
        accs = {f"{n}_acc": accuracy(m, data.x_test, data.y_test)
                for n, m in (("teacher", teacher), ("student", student))}  # fmt: skip
        run.log(**accs, queries=queries)
    typer.echo(f"{run.path}: teacher {100 * accs['teacher_acc']:.2f}%, student ({method}) "
               f"{100 * accs['student_acc']:.2f}%, {queries} teacher queries")  # fmt: skip
