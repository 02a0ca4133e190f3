"""What `lfm distill ...` runs, as Python functions: train, write a run directory, return metrics.

    from lfm.distill import recipes

    out = recipes.vision("kd", train_size=2_000, teacher_steps=100, student_steps=50)
    out.run, out.metrics        # runs/<stamp>-distill-kd/, {"teacher_acc": ..., "student_acc": ...}

- `vision`: Fashion-MNIST, a CNN teacher then a smaller CNN student trained with one loss (`kd`,
  `reverse_kl`, `topk_kd`, `dist`, `fitnets`, `at`, `rkd`, `pkt`, or `student`: labels only).
- `datafree`: the same teacher, then a student that never sees an image (`deep_inversion`,
  `dafl`, `dfad`, `dfme`).
- `lm`: a layer-dropped student of a causal LM on BBC News, trained by `lm_student` (KD + LM
  loss on the teacher's logits) or `seq_kd` (the teacher's greedy continuations of the first half
  of each block, as text); held-out perplexity of both.

Each writes the teacher and student weights and the metrics into a run directory (`lfm.runs.Run`)
whose manifest holds the options (and, for `lm`, the SHA-256 of the teacher's file or folder and
the run that made it, if it is the output of one). A method name that does not exist is an `LfmError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from lfm.access import LocalModel, narrow
from lfm.assets import load_dataset, load_model
from lfm.assets.models import source_path
from lfm.core.train import TrainConfig
from lfm.distill.lm import LMStudentConfig, perplexity, student_from_teacher, token_blocks
from lfm.distill.seqkd import SeqKDConfig
from lfm.distill.vision import (
    DATAFREE,
    accuracy,
    load_fashion_mnist,
    subsample,
    terms,
    train_datafree,
    train_student,
    train_teacher,
)
from lfm.errors import LfmError
from lfm.registry import run as run_method
from lfm.runs import Run, on_disk

LM_METHODS = ("lm_student", "seq_kd")


@dataclass(frozen=True)
class Outcome:
    """Where a recipe wrote its run, and the metrics it logged there."""

    run: Path
    metrics: dict[str, float]


def _choose(method: str, choices: Iterable[str], command: str) -> None:
    """Refuse an unknown method before anything is loaded or written."""
    if method not in choices:
        raise LfmError(f"lfm distill {command}: unknown method {method!r}; choose one of "
                       f"{', '.join(choices)}")  # fmt: skip


def _config(options: dict[str, Any]) -> dict[str, Any]:
    """The options as a run's config (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}


def _save(run: Run, **models: Any) -> None:
    for name, model in models.items():
        with run.output(f"{name}.safetensors") as tmp:
            save_model(model, str(tmp))


def vision(
    method: str = "kd",
    *,
    train_size: int = 10_000,
    test_size: int = 5_000,
    teacher_steps: int = 400,
    student_steps: int = 200,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    ckpt_every: int = 0,
    root: Path = Path("runs"),
    resume: Path | None = None,
) -> Outcome:
    """Fashion-MNIST: train a CNN teacher, then a small CNN student with `method`, into a run.

    Args:
        method: `student`, a row of `lfm.distill.vision.METHODS`, or any registered logit loss.
        train_size, test_size: Fashion-MNIST images used (a class-mixed random subset).
        teacher_steps, student_steps: optimizer steps of each (AdamW at `lr`, batches of
            `batch_size`).
        seed: seeds the subset, the models and the batch order.
        ckpt_every: checkpoint every N steps (0: at the end only).
        root: where run directories are created.
        resume: a run directory to resume (its options must be these).

    Returns:
        the run directory and `{"teacher_acc", "student_acc"}` on the test images.
    """
    terms(method)  # an unknown method is refused before anything loads
    config = _config({k: v for k, v in locals().items() if k != "resume"})
    data = subsample(load_fashion_mnist(), train_size, test_size)
    cfg = TrainConfig(lr=lr, seed=seed, ckpt_every=ckpt_every or 10**9)
    with Run(f"distill-{method}", config, root=root, path=resume) as run:
        t_run = Run("teacher", path=run.path / "teacher")
        teacher = train_teacher(data, cfg.replace(steps=teacher_steps), batch_size, t_run)
        s_run = Run("student", path=run.path / "student")
        student = train_student(
            method, teacher, data, cfg.replace(steps=student_steps), batch_size, s_run
        )
        _save(run, teacher=teacher, student=student)
        accs = {f"{n}_acc": accuracy(m, data.x_test, data.y_test)
                for n, m in (("teacher", teacher), ("student", student))}  # fmt: skip
        run.log(**accs)
    return Outcome(run.path, accs)


def datafree(
    method: str = "deep_inversion",
    *,
    teacher_steps: int = 400,
    train_size: int = 10_000,
    test_size: int = 5_000,
    iterations: int = 200,
    batch_size: int = 64,
    kd_steps: int = 1000,
    synthesis_steps: int = 200,
    competition: float = 0.0,
    seed: int = 0,
    root: Path = Path("runs"),
) -> Outcome:
    """Fashion-MNIST: a CNN teacher, then a student that never sees data (`method`), into a run.

    Args:
        method: `deep_inversion`, `dafl`, `dfad` or `dfme` (the teacher is narrowed to the
            method's access level; `lfm.distill.vision.DATAFREE_RECIPE` sets its config).
        teacher_steps, train_size: the teacher's training (AdamW, lr 3e-3, batches of 64).
        test_size: test images the accuracies are measured on.
        iterations: generator updates (deep_inversion: batches of images synthesised).
        batch_size: generated images per update.
        kd_steps, synthesis_steps, competition: deep_inversion's KD steps on its images, pixel
            updates per batch and Adaptive DeepInversion's α_c.
        seed: seeds the subset, the models and the games.
        root: where run directories are created.

    Returns:
        the run directory and `{"teacher_acc", "student_acc", "queries"}` (teacher forward
        passes on single images).
    """
    _choose(method, DATAFREE, "datafree")
    config = _config(locals())
    data = subsample(load_fashion_mnist(), train_size, test_size)
    extra = (
        {"kd_steps": kd_steps, "steps": synthesis_steps, "competition_weight": competition}
        if method == "deep_inversion"
        else {}
    )
    with Run(f"distill-{method}", config, root=root) as run:
        cfg = TrainConfig(steps=teacher_steps, lr=3e-3, seed=seed, progress=False)
        teacher = train_teacher(data, cfg, 64)
        student, queries = train_datafree(method, teacher, iterations, batch_size, seed, **extra)
        _save(run, teacher=teacher, student=student)
        metrics = {f"{n}_acc": accuracy(m, data.x_test, data.y_test)
                   for n, m in (("teacher", teacher), ("student", student))}  # fmt: skip
        metrics["queries"] = queries
        run.log(**metrics)
    return Outcome(run.path, metrics)


def lm(
    method: str = "lm_student",
    *,
    model: str = "smollm2-135m",
    every: int = 3,
    kd_weight: float = 5.0,
    lm_weight: float = 2.0,
    temperature: float = 2.0,
    steps: int = 40,
    block_size: int = 64,
    batch_size: int = 4,
    lr: float = 5e-4,
    eval_blocks: int = 16,
    seed: int = 0,
    root: Path = Path("runs"),
) -> Outcome:
    """BBC News: a layer-dropped student of `model` (one block in `every`), into a run.

    Args:
        method: `lm_student` (KD on every position + LM loss, weighted `kd_weight` : `lm_weight`
            at `temperature`) or `seq_kd` (the teacher, narrowed to TEXT, continues the first
            half of each training block greedily; the student learns the continuations).
        model: the teacher, an offline model name or a path (a causal LM).
        steps, block_size, batch_size, lr: the student's training (AdamW); the training blocks
            are the first `steps · batch_size` blocks of BBC training articles.
        eval_blocks: held-out BBC blocks the perplexities are measured on.
        seed: seeds the batch order.
        root: where run directories are created.

    Returns:
        the run directory and `{"teacher_ppl", "student_ppl"}`.
    """
    _choose(method, LM_METHODS, "lm")
    config = _config(locals())
    teacher = load_model(model, kind="causal-lm")
    data = load_dataset("bbc-news")
    train_blocks = token_blocks(teacher.tokenizer, data.train_texts, block_size, steps * batch_size)
    test_blocks = token_blocks(teacher.tokenizer, data.test_texts, block_size, eval_blocks)
    train_cfg = TrainConfig(steps=steps, lr=lr, seed=seed, progress=False)
    inputs = on_disk({"model": source_path(model)})
    with Run(f"distill-{method}-{every}", config, inputs=inputs, root=root) as run:
        if method == "lm_student":
            cfg = LMStudentConfig(every=every, kd_weight=kd_weight, lm_weight=lm_weight,
                                  temperature=temperature, block_size=block_size,
                                  batch_size=batch_size)  # fmt: skip
            student = run_method("distill/lm_student", teacher, None, train_blocks, cfg=cfg,
                                 train_cfg=train_cfg, run=run).student  # fmt: skip
        else:
            student = _seq_kd_student(teacher, train_blocks, every, batch_size, train_cfg, run)
        with run.output("student") as tmp:
            student.save_pretrained(tmp)
            teacher.tokenizer.save_pretrained(tmp)
        ppl = {"teacher_ppl": perplexity(teacher.model, test_blocks),
               "student_ppl": perplexity(student, test_blocks)}  # fmt: skip
        run.log(**ppl)
    return Outcome(run.path, ppl)


def _seq_kd_student(
    teacher: LocalModel, blocks: Any, every: int, batch_size: int, train_cfg: TrainConfig, run: Run
) -> Any:
    """Sequence-level KD of a layer-dropped student on the teacher's continuations of the first
    half of each block (the teacher is asked through a TEXT handle)."""
    half = blocks.shape[1] // 2
    prompts = [teacher.decode(b[:half].tolist()) for b in blocks]
    student = LocalModel(student_from_teacher(teacher.model, every), teacher.tokenizer, "student")
    cfg = SeqKDConfig(max_new_tokens=half, batch_size=batch_size)
    res = run_method("distill/seq_kd", narrow(teacher, "text"), student, prompts, cfg=cfg,
                     train_cfg=train_cfg, run=run)  # fmt: skip
    return res.student
