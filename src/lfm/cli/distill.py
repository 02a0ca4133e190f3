"""`lfm distill`: distillation from the command line, a thin layer over `lfm.distill.recipes`."""

from __future__ import annotations

from pathlib import Path

import typer

from lfm.cli.common import Threads, finite, group, stage, use_threads
from lfm.distill import recipes
from lfm.distill.vision import DATAFREE, METHODS

app = group("Model distillation: train a student from a teacher's outputs or features.")

IMAGES_HELP = (
    "your images: DIR/<class>/<images>, or DIR/train/<class>/ and DIR/test/<class>/ "
    "(default: Fashion-MNIST)"
)
ROOT_HELP = "where run directories are created"


def _data(help: str = IMAGES_HELP) -> Path | None:
    return typer.Option(None, "--data", help=help)


def _image_size() -> int:
    return typer.Option(28, min=4, help="--data: images are resized to this square size")


def _holdout() -> float:
    return typer.Option(
        0.2, callback=finite, help="--data without train/ and test/: share of each class held out"
    )


@app.command(placed="train")
def vision(
    method: str = typer.Option(
        "kd",
        help=f"student (no teacher), or a loss: {', '.join(list(METHODS)[1:])}, or any other logit loss",
    ),
    data: Path | None = _data(),
    image_size: int = _image_size(),
    holdout: float = _holdout(),
    train_size: int = typer.Option(10_000, min=1, help="Fashion-MNIST training images used"),
    test_size: int = typer.Option(5_000, min=1, help="Fashion-MNIST test images used"),
    teacher_steps: int = typer.Option(400, min=1, help="optimizer steps for the teacher"),
    student_steps: int = typer.Option(200, min=1, help="optimizer steps for the student"),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(3e-3, callback=finite, help="AdamW learning rate (> 0)"),
    seed: int = typer.Option(0),
    ckpt_every: int = typer.Option(0, min=0, help="checkpoint every N steps (0: at the end only)"),
    root: Path = typer.Option(Path("runs"), help=ROOT_HELP),
    resume: Path | None = typer.Option(None, help="a run directory to resume"),
    threads: Threads = 2,
) -> None:
    """Fashion-MNIST or your images: a CNN teacher, then a small CNN student with METHOD, into a
    run."""
    use_threads(threads)
    out = recipes.vision(
        method, data=data, image_size=image_size, holdout=holdout, train_size=train_size,
        test_size=test_size, teacher_steps=teacher_steps, student_steps=student_steps,
        batch_size=batch_size, lr=lr, seed=seed, ckpt_every=ckpt_every, root=root, resume=resume,
        progress=True, stage=stage,
    )  # fmt: skip
    m = out.metrics
    typer.echo(f"{out.run}: teacher {100 * m['teacher_acc']:.2f}%, "
               f"student ({method}) {100 * m['student_acc']:.2f}%")  # fmt: skip


@app.command(placed="train")
def lm(
    method: str = typer.Option("lm_student", help=f"one of: {', '.join(recipes.LM_METHODS)}"),
    model: str = typer.Option("smollm2-135m", help="teacher: an offline model name or a path"),
    data: Path | None = _data(
        "your UTF-8 text file: training blocks from its first 90 %, perplexity blocks from the "
        "last 10 % (default: BBC News)"
    ),
    eval_data: Path | None = typer.Option(
        None, help="--data: a UTF-8 text file for the perplexity blocks instead"
    ),
    every: int = typer.Option(3, min=1, help="keep one block in EVERY"),
    kd_weight: float = typer.Option(
        5.0,
        min=0.0,
        callback=finite,
        help="lm_student, topk_lm: weight of the KD term (0: LM loss only)",
    ),
    lm_weight: float = typer.Option(
        2.0, min=0.0, callback=finite, help="lm_student, topk_lm: weight of the LM loss"
    ),
    temperature: float | None = typer.Option(
        None,
        callback=finite,
        help="lm_student, topk_lm: KD temperature (> 0; default 2, and 1 for topk_lm)",
    ),
    steps: int = typer.Option(40, min=1, help="optimizer steps"),
    block_size: int = typer.Option(64, min=2, help="tokens per training block"),
    batch_size: int = typer.Option(4, min=1, help="blocks per step"),
    lr: float = typer.Option(5e-4, callback=finite, help="AdamW learning rate (> 0)"),
    eval_blocks: int = typer.Option(16, min=1, help="held-out blocks for perplexity (at most)"),
    seed: int = typer.Option(0),
    ckpt_every: int = typer.Option(
        0, min=0, help="checkpoint the student every N steps (0: never)"
    ),
    top_k: int = typer.Option(
        20, min=1, help="topk_lm, gkd: log-probabilities per token the teacher sends"
    ),
    hint_weight: float = typer.Option(
        1e-3,
        min=0.0,
        callback=finite,
        help="fitnets: weight of the hint term (the default suits SmolLM2's large hidden states)",
    ),
    hint: str | None = typer.Option(
        None, help="fitnets: the teacher's module (default: the block the middle one came from)"
    ),
    guided: str | None = typer.Option(
        None, help="fitnets: the student's module (default: its middle block)"
    ),
    teacher_url: str | None = typer.Option(
        None,
        help="topk_lm, gkd: a served teacher (lfm serve --access scores [--top-k K]); "
        "fitnets: one served at --access hidden; seq_kd: any served model (its text); MODEL "
        "is then what the student is cut from",
    ),
    api_key: str | None = typer.Option(None, help="--teacher-url: its key"),
    teacher_cache: Path | None = typer.Option(
        None,
        help="topk_lm: a file of the teacher's answers (lfm distill cache); MODEL is then "
        "what the student is cut from",
    ),
    student: str | None = typer.Option(
        None,
        help="topk_lm, gkd, fitnets: train this causal LM (name or folder) instead of a "
        "layer-dropped MODEL (with a served or cached teacher, MODEL is then never loaded); "
        "uld: the model of another tokenizer the student is cut from (one block in EVERY)",
    ),
    root: Path = typer.Option(Path("runs"), help=ROOT_HELP),
    resume: Path | None = typer.Option(
        None, help="a run directory to resume from its last checkpoint (same options)"
    ),
    threads: Threads = 2,
) -> None:
    """BBC News or your text: a layer-dropped student of MODEL trained with METHOD, into a run."""
    use_threads(threads)
    out = recipes.lm(
        method, model=model, data=data, eval_data=eval_data, every=every, kd_weight=kd_weight,
        lm_weight=lm_weight, temperature=temperature, steps=steps, block_size=block_size,
        batch_size=batch_size, lr=lr, eval_blocks=eval_blocks, seed=seed, ckpt_every=ckpt_every,
        top_k=top_k, hint_weight=hint_weight, hint=hint, guided=guided,
        teacher=_served(teacher_url, api_key, _LEVELS.get(method, "scores")),
        teacher_cache=teacher_cache,
        student=student, root=root, resume=resume, progress=True, stage=stage,
    )  # fmt: skip
    if out is None:  # not the main process of a launched run
        return
    m = out.metrics
    teacher = f"teacher {m['teacher_ppl']:.2f}, " if "teacher_ppl" in m else ""
    typer.echo(f"{out.run}: perplexity {teacher}student ({method}) {m['student_ppl']:.2f}")


_LEVELS = {"fitnets": "hidden", "seq_kd": "text"}  # what a served teacher is asked for


def _served(url: str | None, key: str | None, access: str = "scores") -> object:
    """A handle at `access` on a served teacher, or None."""
    if not url:
        if key:
            raise typer.BadParameter("--api-key needs --teacher-url")
        return None
    from lfm.serve import RemoteModel

    return RemoteModel(url, api_key=key, access=access)


@app.command(placed=True)
def cache(
    out: Path = typer.Option(..., "--out", "-o", help="the cache file to write (.npz)"),
    model: str = typer.Option(
        "smollm2-135m", help="the teacher (or, with --teacher-url, its tokenizer's source)"
    ),
    teacher_url: str | None = typer.Option(None, help="a served teacher instead of MODEL"),
    api_key: str | None = typer.Option(None, help="--teacher-url: its key"),
    top_k: int = typer.Option(20, min=1, help="log-probabilities per token to keep"),
    data: Path | None = _data("your UTF-8 text file (default: BBC News), as distill lm reads it"),
    eval_data: Path | None = typer.Option(None, help="as distill lm"),
    steps: int = typer.Option(40, min=1, help="as distill lm: steps × batch size blocks"),
    block_size: int = typer.Option(64, min=2, help="as distill lm"),
    batch_size: int = typer.Option(4, min=1, help="as distill lm"),
    threads: Threads = 2,
) -> None:
    """Save a teacher's top-k log-probabilities on the blocks distill lm would train on, for
    `distill lm --method topk_lm --teacher-cache FILE` (no teacher in memory while it trains)."""
    use_threads(threads)
    path, n = recipes.cache(
        model=model, teacher=_served(teacher_url, api_key), out=out, top_k=top_k, data=data,
        eval_data=eval_data, steps=steps, block_size=block_size, batch_size=batch_size,
        progress=True, stage=stage,
    )  # fmt: skip
    typer.echo(f"{path}: top {top_k} of {n} blocks, {path.stat().st_size / 2**20:.1f} MiB")


@app.command(placed="train")
def datafree(
    method: str = typer.Option("deep_inversion", help=f"one of: {', '.join(DATAFREE)}"),
    data: Path | None = _data(IMAGES_HELP + "; only the teacher trains on them"),
    image_size: int = _image_size(),
    holdout: float = _holdout(),
    teacher_steps: int = typer.Option(400, min=1, help="optimizer steps for the teacher"),
    train_size: int = typer.Option(
        10_000, min=1, help="Fashion-MNIST images the teacher is trained on"
    ),
    test_size: int = typer.Option(5_000, min=1, help="Fashion-MNIST test images used"),
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
    ckpt_every: int = typer.Option(
        100,
        min=0,
        help="checkpoint every N teacher steps and every N generator updates "
        "(deep_inversion: batches), and after the last (0: never)",
    ),
    root: Path = typer.Option(Path("runs"), help=ROOT_HELP),
    resume: Path | None = typer.Option(
        None, help="a run directory to resume from its last checkpoint (same options)"
    ),
    threads: Threads = 2,
) -> None:
    """Fashion-MNIST or your images: a CNN teacher, then a student that never sees them (METHOD)."""
    use_threads(threads)
    out = recipes.datafree(
        method, data=data, image_size=image_size, holdout=holdout, teacher_steps=teacher_steps,
        train_size=train_size, test_size=test_size, iterations=iterations, batch_size=batch_size,
        kd_steps=kd_steps, synthesis_steps=synthesis_steps, competition=competition, seed=seed,
        ckpt_every=ckpt_every, root=root, resume=resume, progress=True, stage=stage,
    )  # fmt: skip
    m = out.metrics
    typer.echo(f"{out.run}: teacher {100 * m['teacher_acc']:.2f}%, student ({method}) "
               f"{100 * m['student_acc']:.2f}%, {int(m['queries'])} teacher queries")  # fmt: skip
