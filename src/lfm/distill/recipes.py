"""What `lfm distill ...` runs, as Python functions: train, write a run directory, return metrics.

    from lfm.distill import recipes

    out = recipes.vision("kd", train_size=2_000, teacher_steps=100, student_steps=50)
    out.run, out.metrics        # runs/<stamp>-distill-kd/, {"teacher_acc": ..., "student_acc": ...}
    recipes.vision("kd", data="photos/")   # your images: photos/<class>/<images>

- `vision`: Fashion-MNIST (or your image folder), a CNN teacher then a smaller CNN student trained
  with one loss (`kd`, `reverse_kl`, `topk_kd`, `dist`, `fitnets`, `at`, `rkd`, `pkt`, or
  `student`: labels only).
- `datafree`: the same teacher, then a student that never sees an image (`deep_inversion`,
  `dafl`, `dfad`, `dfme`).
- `lm`: a layer-dropped student of a causal LM on BBC News (or your text file), trained by
  `lm_student` (KD + LM loss on the teacher's logits), `seq_kd` (the teacher's greedy
  continuations of the first half of each block, as text), `topk_lm` or `gkd` (the teacher's
  top-k log-probabilities), `fitnets` (FitNets' hint between a middle block of each, from a
  teacher at HIDDEN, + LM loss) or `uld` (a teacher of another tokenizer); held-out perplexity.

Each writes the teacher and student weights, the metrics and the learning curves (`curves.png`)
into a run directory (`lfm.runs.Run`) whose manifest holds the options and the SHA-256 of what it
read (the teacher's file or folder for `lm`, and your data), and for an image folder its classes
and split. Each checkpoints its training into the run directory (`ckpt_every`) and goes on from the
checkpoints of a run directory given as `resume`. A method name that does not exist, or data that
cannot be used, is an `LfmError`
raised before anything trains. `progress=True` shows bars; `stage` is called with a line as each
stage begins (the command line prints it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from lfm.access import Access, LocalModel, narrow
from lfm.assets import load_dataset, load_model
from lfm.assets.models import source_path
from lfm.core.checkpoints import Checkpoints
from lfm.core.hooks import modules_by_name
from lfm.core.layouts import get_layout, num_layers
from lfm.core.runs import read_manifest
from lfm.core.train import TrainConfig, run_on_main, shuffled_batches
from lfm.distill.contract import DistillResult
from lfm.distill.distiller import distill
from lfm.distill.lm import (
    LMStudentConfig,
    kept_blocks,
    most_tokens,
    perplexity,
    read_text,
    split_text,
    student_from_teacher,
    token_blocks,
)
from lfm.distill.seqkd import SeqKDConfig
from lfm.distill.served import GKDConfig, TopKCache, TopKLMConfig, cache_topk
from lfm.distill.vision import (
    DATAFREE,
    Data,
    accuracy,
    fit_datafree,
    fit_student,
    fit_teacher,
    load_fashion_mnist,
    load_image_folder,
    subsample,
    terms,
)
from lfm.distill.xtok import ULDConfig, held_out_blocks, layer_dropped, text_blocks
from lfm.errors import ConfigError, LfmError
from lfm.registry import run as run_method
from lfm.runs import Run, on_disk

SCORES_METHODS = ("topk_lm", "gkd")  # teachers that send top-k log-probabilities
HIDDEN_METHODS = ("fitnets",)  # teachers that send hidden states (a served one at HIDDEN)
TEXT_METHODS = ("seq_kd",)  # teachers that send text: any served model
_TAKES = {"--teacher-url": "topk_lm, gkd, fitnets or seq_kd", "--teacher-cache": "topk_lm",
          "--student": "topk_lm, gkd, fitnets or uld"}  # fmt: skip
SERVED_METHODS = (*SCORES_METHODS, *HIDDEN_METHODS)
LM_METHODS = ("lm_student", "seq_kd", *SERVED_METHODS, "uld")
Stage = Callable[[str], None] | None


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
    """The options as a run's config (paths as strings), without `resume` and the progress
    callbacks, which do not change the result."""
    skip = {"resume", "progress", "stage"}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if k not in skip}


def _say(stage: Stage, message: str) -> None:
    if stage is not None:
        stage(message)


def _save(run: Run, **models: Any) -> None:
    for name, model in models.items():
        with run.output(f"{name}.safetensors") as tmp:
            save_model(model, str(tmp))


def _images(
    data: Path | None, image_size: int, holdout: float, seed: int, train_size: int,
    test_size: int,
) -> tuple[Data, dict[str, Any] | None]:  # fmt: skip
    """Fashion-MNIST (a random subset), or the image folder `data` with its classes and split
    (read without a stage line: a bad folder is then the command's only line)."""
    if data is None:
        return subsample(load_fashion_mnist(), train_size, test_size), None
    images, classes, split = load_image_folder(data, image_size, holdout, seed)
    return images, {"classes": classes, **split}


def _image_options(options: dict[str, Any]) -> dict[str, Any]:
    """The config of an image recipe: the subset sizes for Fashion-MNIST, else the folder's size
    and split."""
    own = ("image_size", "holdout")
    drop = ("train_size", "test_size") if options["data"] is not None else ("data", *own)
    return _config({k: v for k, v in options.items() if k not in drop})


def _record_images(run: Run, data: Path | None, about: dict[str, Any] | None) -> None:
    """Keep the folder's classes and split in the manifest (`Run` checks a resumed run's
    folder is the one it first read)."""
    if data is None or about is None:
        return
    run.manifest["data"] = about
    run.save()


def _accuracies(data: Data, **models: Any) -> dict[str, float]:
    return {f"{n}_acc": accuracy(m, data.x_test, data.y_test) for n, m in models.items()}


def vision(
    method: str = "kd",
    *,
    data: Path | None = None,
    image_size: int = 28,
    holdout: float = 0.2,
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
    progress: bool = False,
    stage: Stage = None,
) -> Outcome:
    """Fashion-MNIST or your images: train a CNN teacher, then a small CNN student with `method`.

    Args:
        method: `student`, a row of `lfm.distill.vision.METHODS`, or any registered logit loss.
        data: an image folder (`root/<class>/<images>`, or `root/train/<class>/` and
            `root/test/<class>/`); None: Fashion-MNIST. The CNNs are built for its classes and
            channels.
        image_size: `data`'s images are resized to this square size.
        holdout: the share of each class held out for testing when `data` has no train/test split.
        train_size, test_size: Fashion-MNIST images used (a class-mixed random subset).
        teacher_steps, student_steps: optimizer steps of each (AdamW at `lr`, batches of
            `batch_size`, at most the training set).
        seed: seeds the subset or split, the models and the batch order.
        ckpt_every: checkpoint every N steps (0: at the end only).
        root: where run directories are created.
        resume: a run directory to resume (its options must be these).
        progress: show the training bars.
        stage: called with one line as each stage begins.

    Returns:
        the run directory and `{"teacher_acc", "student_acc"}` on the test images.
    """
    terms(method)  # an unknown method is refused before anything loads
    config = _image_options(locals())
    images, about = _images(data, image_size, holdout, seed, train_size, test_size)
    inputs = on_disk({"data": data})
    cfg = TrainConfig(lr=lr, seed=seed, ckpt_every=ckpt_every or 10**9, progress=progress)
    with Run(f"distill-{method}", config, inputs=inputs, root=root, path=resume) as run:
        _record_images(run, data, about)
        _say(stage, f"training the teacher ({teacher_steps} steps)")
        t_run = Run("teacher", path=run.path / "teacher")
        teacher, t_hist = fit_teacher(images, cfg.replace(steps=teacher_steps), batch_size, t_run)
        _say(stage, f"training the student with {method} ({student_steps} steps)")
        s_run = Run("student", path=run.path / "student")
        student, s_hist = fit_student(method, teacher, images, cfg.replace(steps=student_steps),
                                      batch_size, s_run)  # fmt: skip
        _save(run, teacher=teacher, student=student)
        run.history("teacher_loss", t_hist.losses)
        run.history("student_loss", s_hist.losses)
        accs = _accuracies(images, teacher=teacher, student=student)
        run.log(**accs)
    return Outcome(run.path, accs)


def _check_generator_size(method: str, data: Path | None, image_size: int) -> None:
    """The games' generator doubles an S/4 map twice: refuse another size before any work."""
    if data is not None and method != "deep_inversion" and image_size % 4:
        raise ConfigError(f"{method}'s generator makes images whose size is a multiple of 4, not "
                          f"{image_size}: pick another image size (deep_inversion takes any)")  # fmt: skip


def _datafree_curves(run: Run, method: str, res: DistillResult) -> None:
    """The student's (and the generator's or the synthesis') losses, into the run's curves."""
    if method == "deep_inversion":
        synth = res.info["synthesis"]  # per batch, one record per pixel update
        mean = [sum(b[i]["loss"] for b in synth) / len(synth) for i in range(len(synth[0]))]
        run.history("synthesis_loss", mean, xlabel="pixel update (mean over batches)")
        kd = [x for h in res.history for x in h.losses]
        run.history("student_loss", kd, xlabel="KD step")
        return
    rows = res.history  # one record per generator update
    student = next(k for k in rows[0] if k.startswith("s_"))
    run.history("student_loss", [r[student] for r in rows], xlabel="generator update")
    generator = next((k for k in ("g_loss", "g_disc") if k in rows[0]), None)
    if generator is not None:  # DFME's generator follows a gradient estimate, not a loss
        run.history("generator_loss", [r[generator] for r in rows], xlabel="generator update")


def datafree(
    method: str = "deep_inversion",
    *,
    data: Path | None = None,
    image_size: int = 28,
    holdout: float = 0.2,
    teacher_steps: int = 400,
    train_size: int = 10_000,
    test_size: int = 5_000,
    iterations: int = 200,
    batch_size: int = 64,
    kd_steps: int = 1000,
    synthesis_steps: int = 200,
    competition: float = 0.0,
    seed: int = 0,
    ckpt_every: int = 100,
    root: Path = Path("runs"),
    resume: Path | None = None,
    progress: bool = False,
    stage: Stage = None,
) -> Outcome:
    """Fashion-MNIST or your images: a CNN teacher, then a student that never sees them (`method`).

    Args:
        method: `deep_inversion`, `dafl`, `dfad` or `dfme` (the teacher is narrowed to the
            method's access level; `lfm.distill.vision.DATAFREE_RECIPE` sets its config).
        data: an image folder as in `vision` (None: Fashion-MNIST); only the teacher trains on
            it, the student is tested on its held-out images. The generators make images of its
            shape (the games need `image_size` a multiple of 4).
        image_size, holdout: as in `vision`.
        teacher_steps, train_size: the teacher's training (AdamW, lr 3e-3, batches of 64, at
            most the training set).
        test_size: Fashion-MNIST test images the accuracies are measured on.
        iterations: generator updates (deep_inversion: batches of images synthesised).
        batch_size: generated images per update.
        kd_steps, synthesis_steps, competition: deep_inversion's KD steps on its images, pixel
            updates per batch and Adaptive DeepInversion's α_c.
        seed: seeds the subset or split, the models and the games.
        ckpt_every: checkpoint every N steps of the teacher and every N generator updates
            (deep_inversion: batches synthesised, each with its KD round if any), and after the
            last of each (0: never).
        root: where run directories are created.
        resume: a run directory to resume from its checkpoints (its options must be these): the
            teacher's training, then the method's loop, go on from where they were saved.
        progress: show the training, synthesis and game bars.
        stage: called with one line as each stage begins.

    Returns:
        the run directory and `{"teacher_acc", "student_acc", "queries"}` (teacher forward
        passes on single images).
    """
    _choose(method, DATAFREE, "datafree")
    _check_generator_size(method, data, image_size)
    config = _image_options(locals())
    images, about = _images(data, image_size, holdout, seed, train_size, test_size)
    extra = (
        {"kd_steps": kd_steps, "steps": synthesis_steps, "competition_weight": competition}
        if method == "deep_inversion"
        else {}
    )
    if resume is not None:
        read_manifest(resume)  # one line when it is not a run directory
    inputs = on_disk({"data": data})
    with Run(f"distill-{method}", config, inputs=inputs, root=root, path=resume) as run:
        _record_images(run, data, about)
        _say(stage, f"training the teacher ({teacher_steps} steps)")
        cfg = TrainConfig(steps=teacher_steps, lr=3e-3, seed=seed, ckpt_every=ckpt_every,
                          progress=progress)  # fmt: skip
        teacher, t_hist = fit_teacher(images, cfg, 64, Run("teacher", path=run.path / "teacher"))
        _say(stage, _datafree_stage(method, iterations, batch_size, synthesis_steps, kd_steps))
        res = fit_datafree(method, teacher, iterations, batch_size, seed, inputs=images.spec,
                           progress=progress, ckpt=Checkpoints(run, ckpt_every), **extra)  # fmt: skip
        _save(run, teacher=teacher, student=res.student)
        run.history("teacher_loss", t_hist.losses)
        _datafree_curves(run, method, res)
        metrics = _accuracies(images, teacher=teacher, student=res.student)
        metrics["queries"] = int(res.info["queries"])
        run.log(**metrics)
    return Outcome(run.path, metrics)


def _datafree_stage(method: str, iterations: int, batch: int, synthesis: int, kd: int) -> str:
    if method == "deep_inversion":
        return (f"deep_inversion: synthesising {iterations} batches of {batch} images "
                f"({synthesis} pixel updates each), then {kd} KD steps")  # fmt: skip
    return f"{method}: {iterations} generator updates, each followed by the student's"


def _text_blocks(
    tokenizer: Any, texts: tuple[str, str], block_size: int, n_train: int, n_eval: int,
    batch_size: int, what: str,
) -> tuple[Any, Any]:  # fmt: skip
    """Training and perplexity blocks of a (train, eval) text pair; too few is a `ConfigError`."""
    train = token_blocks(tokenizer, [texts[0]], block_size, n_train)
    test = token_blocks(tokenizer, [texts[1]], block_size, n_eval)
    if len(train) < batch_size or len(test) < 1:
        raise ConfigError(
            f"{what} gives {len(train)} training and {len(test)} perplexity blocks of "
            f"{block_size} tokens; at least {batch_size} (--batch-size) and 1 are needed: give "
            "more text or a smaller --block-size"
        )
    return train, test


def _own_text(
    data: Path, eval_data: Path | None, block_size: int, batch_size: int
) -> tuple[tuple[str, str], str]:
    """The (train, eval) texts of your file(s), refused when surely too short (before any model
    loads: a token stands for at least one byte), and how they were split."""
    text = read_text(data)
    if eval_data is None:
        texts, how = split_text(text), f"first 90 % of {data} / last 10 %"
    else:
        texts, how = (text, read_text(eval_data)), f"{data} / {eval_data}"
    short = [
        (name, len(t.encode("utf-8")), need)
        for name, t, need in (("training", texts[0], batch_size * block_size),
                              ("perplexity", texts[1], block_size))
        if most_tokens(t) < need
    ]  # fmt: skip
    if short:
        name, size, need = short[0]
        raise ConfigError(
            f"the {name} text ({how}) has {size} bytes, fewer than the {need} tokens one "
            f"{'batch of blocks' if name == 'training' else 'block'} needs: give more text or a "
            "smaller --block-size"
        )
    return texts, how


def lm(
    method: str = "lm_student",
    *,
    model: str = "smollm2-135m",
    data: Path | None = None,
    eval_data: Path | None = None,
    every: int = 3,
    kd_weight: float = 5.0,
    lm_weight: float = 2.0,
    temperature: float | None = None,
    steps: int = 40,
    block_size: int = 64,
    batch_size: int = 4,
    lr: float = 5e-4,
    eval_blocks: int = 16,
    seed: int = 0,
    ckpt_every: int = 0,
    top_k: int = 20,
    hint_weight: float = 1e-3,
    hint: str | None = None,
    guided: str | None = None,
    teacher: Any = None,
    teacher_cache: Path | None = None,
    student: str | None = None,
    root: Path = Path("runs"),
    resume: Path | None = None,
    progress: bool = False,
    stage: Stage = None,
) -> Outcome | None:
    """BBC News or your text: a layer-dropped student of `model` (one block in `every`), into a run.

    Args:
        method: `lm_student` (KD on every position + LM loss, weighted `kd_weight` : `lm_weight`
            at `temperature`) or `seq_kd` (the teacher, narrowed to TEXT, continues the first
            half of each training block greedily; the student learns the continuations), or,
            from a teacher's top-`top_k` log-probabilities only, `topk_lm` (KD with the rest of the
            teacher's mass spread evenly over the other tokens, and the LM loss) or `gkd`
            (on-policy: the student continues half of the blocks itself; generalised JSD, β = 0.5),
            or, from a teacher's hidden states, `fitnets` (FitNets' hint: a regressor maps the
            student's `guided` block onto the teacher's `hint` block, mean squared error, weighted
            `hint_weight` beside the LM loss weighted `lm_weight`).
        model: the teacher, an offline model name or a path (a causal LM); for `topk_lm` and
            `gkd` with a `teacher` or `teacher_cache`, the model the student is cut from (of
            the teacher's vocabulary).
        data: a UTF-8 text file: training blocks are cut from its first 90 %, perplexity blocks
            from the last 10 % (or from `eval_data`); None: BBC News articles.
        eval_data: a UTF-8 text file for the perplexity blocks (with `data` only).
        steps, block_size, batch_size, lr: the student's training (AdamW); the training blocks
            are the first `steps · batch_size` blocks of the training text (fewer when it is
            shorter; at least `batch_size` are needed).
        eval_blocks: held-out blocks the perplexities are measured on (at most).
        seed: seeds the batch order.
        ckpt_every: checkpoint the student every N steps (0: never).
        top_k: `topk_lm`, `gkd`: log-probabilities per token the teacher sends.
        hint_weight: `fitnets`: weight of the hint term (1e-3 brings SmolLM2's, whose hidden
            states reach a mean square of ~4 × 10⁴, to the LM loss's scale).
        hint, guided: `fitnets`: the teacher's and the student's module (default: the student's
            middle block, and the teacher block it was copied from, or the block at the same
            depth when `student` is given).
        teacher: `topk_lm`, `gkd`: a handle with `top_logprobs` (a served model) instead of
            `model` narrowed to SCORES; `fitnets`: a handle with `hidden` (a server at HIDDEN)
            instead of `model` narrowed to HIDDEN.
        teacher_cache: `topk_lm`: a file of the teacher's answers (`cache`); no teacher is asked.
        student: `topk_lm`, `gkd`, `fitnets`: a causal LM (name or folder) trained as it is, instead of a
            layer-dropped copy of `model` (which is then not loaded at all when the teacher is
            served or cached).
        root: where run directories are created.
        resume: a run directory to resume from its checkpoint (its options must be these).
        progress: show the training bar.
        stage: called with one line as each stage begins.

    Returns:
        the run directory and `{"teacher_ppl", "student_ppl"}`; None on the processes other
        than the main one of a launched run (`accelerate launch`), which write nothing.
    """
    _choose(method, LM_METHODS, "lm")
    if eval_data is not None and data is None:
        raise ConfigError("--eval-data needs --data (BBC News has its own test articles)")
    _check_scores_options(method, teacher, teacher_cache, student)
    if method not in HIDDEN_METHODS and (hint or guided):
        raise ConfigError(f"--hint and --guided are for --method fitnets, not {method}")
    if temperature is None:  # DistilBERT's T = 2; API log-probabilities (and ULD) at T = 1
        temperature = 1.0 if method in (*SCORES_METHODS, "uld") else 2.0
    config = _config(locals())
    if teacher is not None:
        config["teacher"] = str(getattr(teacher, "url", teacher))
    own = _own_text(data, eval_data, block_size, batch_size) if data is not None else None
    cache = TopKCache(teacher_cache) if teacher_cache is not None else None
    if method in SERVED_METHODS:
        return _scores_lm(method, model, own, teacher or cache, student, config, locals(), stage)
    if method == "uld":
        return _uld_lm(model, own, student, config, locals(), stage)
    served, teacher = teacher, load_model(model, kind="causal-lm")  # a bad model is one line
    _say(stage, f"{'student cut from' if served else 'teacher'} {model} loaded; cutting the text "
                "into blocks")  # fmt: skip
    train_blocks, test_blocks = lm_blocks(teacher.tokenizer, own, block_size, steps * batch_size,
                                          eval_blocks, batch_size)  # fmt: skip
    train_cfg = TrainConfig(steps=steps, lr=lr, seed=seed, ckpt_every=ckpt_every,
                            progress=progress)  # fmt: skip
    inputs = on_disk({"model": source_path(model), "data": data, "eval_data": eval_data})
    run = run_on_main(f"distill-{method}-{every}", config, inputs=inputs, root=root, path=resume,
                      cpu=train_cfg.cpu)  # one run directory under `accelerate launch`  # fmt: skip
    with run or nullcontext():
        if own is not None and run is not None:
            run.manifest["data"] = {"split": own[1], "train_blocks": len(train_blocks),
                                    "eval_blocks": len(test_blocks)}  # fmt: skip
            run.save()
        if method == "lm_student":
            _say(stage, f"training the student ({steps} steps)")
            cfg = LMStudentConfig(every=every, kd_weight=kd_weight, lm_weight=lm_weight,
                                  temperature=temperature, block_size=block_size,
                                  batch_size=batch_size)  # fmt: skip
            res = run_method("distill/lm_student", teacher, None, train_blocks, cfg=cfg,
                             train_cfg=train_cfg, run=run)  # fmt: skip
        else:
            asked = served if served is not None else narrow(teacher, "text")
            res = _seq_kd_student(teacher, asked, train_blocks, every, batch_size, train_cfg, run,
                                  stage)  # fmt: skip
        if run is None:  # another process of a launched run: the main one saves and reports
            return None
        ppl = _finish(run, res, teacher.tokenizer, test_blocks, stage,
                      teacher.model if served is None else None)  # fmt: skip
        run.log(**ppl)
    return Outcome(run.path, ppl)


def lm_blocks(
    tok: Any, own: tuple[tuple[str, str], str] | None, block_size: int, n_train: int,
    n_eval: int, batch_size: int,
) -> tuple[Any, Any]:  # fmt: skip
    """Training and perplexity blocks: BBC News (its train and test articles), or your text."""
    if own is None:
        train, test = _bbc_texts()
        return (token_blocks(tok, train, block_size, n_train),
                token_blocks(tok, test, block_size, n_eval))  # fmt: skip
    return _text_blocks(tok, own[0], block_size, n_train, n_eval, batch_size, own[1])


def _check_scores_options(
    method: str, teacher: Any, teacher_cache: Path | None, student: str | None
) -> None:
    """The options that only a top-k teacher takes, refused with the others before loading."""
    if method == "uld":
        if student is None:
            raise ConfigError("uld needs --student MODEL: the model (with its own tokenizer) the "
                              "student is cut from")  # fmt: skip
        if teacher is not None or teacher_cache is not None:
            raise ConfigError("uld reads the teacher's whole distributions: give it as --model")
        return
    if method not in SERVED_METHODS:
        text = method in TEXT_METHODS  # a served teacher's text will do
        given = [n for n, v in (("--teacher-url", None if text else teacher),
                                ("--teacher-cache", teacher_cache), ("--student", student))
                 if v is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{given[0]} is for --method {_TAKES[given[0]]}, not {method}")
        return
    if method in HIDDEN_METHODS and teacher_cache is not None:
        raise ConfigError(f"{method} reads the teacher's hidden states, which no cache holds: "
                          "give --teacher-url (lfm serve --access hidden) or the local --model")  # fmt: skip
    if teacher is not None and teacher_cache is not None:
        raise ConfigError("give --teacher-url or --teacher-cache, not both")
    if method == "gkd" and teacher_cache is not None:
        raise ConfigError("gkd asks the teacher about the student's own samples, which no cache "
                          "holds: give --teacher-url, or no teacher (the local --model)")  # fmt: skip


def _scores_lm(
    method: str, model: str, own: Any, remote: Any, student: str | None, config: dict[str, Any],
    o: dict[str, Any], stage: Stage,
) -> Outcome | None:  # fmt: skip
    """`topk_lm` or `gkd`: a teacher sending its top-k only (served, cached, or `model` narrowed
    to SCORES), or `fitnets`: a teacher sending hidden states (served, or `model` narrowed to
    HIDDEN); a student of its vocabulary (`student`, or `model` layer-dropped)."""
    hidden = method in HIDDEN_METHODS
    if hidden and remote is not None and student is not None and not o["hint"]:
        raise ConfigError("with --teacher-url and --student, name the served teacher's block the "
                          "hint is read from: --hint model.layers.N")  # fmt: skip
    if hidden and remote is not None:  # a served model says what it gives
        level = str(remote.info().get("lfm_access", "text"))
        if Access.parse(level) < Access.HIDDEN:
            raise ConfigError(f"{method} reads the teacher's hidden states and {remote.url} "
                              f"gives {level.upper()}: serve it with `lfm serve --access hidden`")  # fmt: skip
    local = None
    if remote is None or student is None:  # the local teacher, or what the student is cut from
        local = load_model(model, kind="causal-lm")
    base = load_model(student, kind="causal-lm") if student is not None else local
    tok = base.tokenizer
    pupil = base.model if student is not None else student_from_teacher(local.model, o["every"])
    teacher = remote if remote is not None else narrow(local, "hidden" if hidden else "scores")
    pair = _hint_pair(pupil, local, student is None, o) if hidden else None
    if hidden and student is not None:  # token rows mean the same text to both only then
        theirs, own = int(teacher.vocab_size), int(pupil.get_input_embeddings().weight.shape[0])
        if theirs != own:
            raise ConfigError(f"{method} sends the student's token rows to the teacher, so both "
                              f"need one tokenizer; their vocabularies differ ({theirs} and "
                              f"{own}): for another tokenizer use --method uld")  # fmt: skip
    if remote is not None:
        local = None  # the teacher is elsewhere: drop the model the student was cut from
    what = f"hint {pair[1]} -> {pair[0]}" if pair else f"top {o['top_k']}"
    _say(stage, f"teacher {getattr(teacher, 'name', model)} ({what}); cutting the text into "
                "blocks")  # fmt: skip
    train_blocks, test_blocks = lm_blocks(tok, own, o["block_size"], o["steps"] * o["batch_size"],
                                          o["eval_blocks"], o["batch_size"])  # fmt: skip
    if pair is not None:  # both modules exist, checked before any run directory is made
        modules_by_name(pupil, [pair[0]])
        teacher.hidden(train_blocks[:1, :2], [pair[1]])  # one 2-token row: the teacher's check
    train_cfg = TrainConfig(steps=o["steps"], lr=o["lr"], seed=o["seed"],
                            ckpt_every=o["ckpt_every"], progress=o["progress"])  # fmt: skip
    paths = {"model": source_path(model) if local is not None else None, "data": o["data"],
             "eval_data": o["eval_data"], "teacher_cache": o["teacher_cache"],
             "student": source_path(student) if student is not None else None}  # fmt: skip
    name = f"distill-{method}" + ("" if hidden else f"-{o['top_k']}")
    run = run_on_main(name, config, inputs=on_disk(paths), root=o["root"], path=o["resume"],
                      cpu=train_cfg.cpu)  # fmt: skip
    with run or nullcontext():
        if pair is not None:
            _say(stage, f"training the student ({o['steps']} steps, {what})")
            batches = shuffled_batches(train_blocks, batch_size=o["batch_size"], seed=o["seed"])
            losses = [("fitnets", o["hint_weight"], None, *pair)]
            history = distill(teacher, pupil, batches, losses, train_cfg, o["lm_weight"], run)
            if run is None:
                return None
            ppl = _finish(run, DistillResult(pupil, history), tok, test_blocks, stage,
                          local.model if local else None)  # fmt: skip
            run.log(**ppl, hint=pair[1], guided=pair[0])
            return Outcome(run.path, ppl)
        if method == "topk_lm":
            cfg: Any = TopKLMConfig(k=o["top_k"], temperature=o["temperature"],
                                    kd_weight=o["kd_weight"], lm_weight=o["lm_weight"],
                                    batch_size=o["batch_size"])  # fmt: skip
        else:
            # forward KL (β = 0): this command reports perplexity, which JSD(0.5) wrecks by
            # seeking the teacher's modes
            cfg = GKDConfig(k=o["top_k"], batch_size=o["batch_size"], beta=0.0)
        _say(stage, f"training the student ({o['steps']} steps, teacher's top {o['top_k']})")
        res = run_method(f"distill/{method}", teacher, pupil, train_blocks, cfg=cfg,
                         train_cfg=train_cfg, run=run)  # fmt: skip
        if run is None:
            return None
        ppl = _finish(run, res, tok, test_blocks, stage, local.model if local else None)
        run.log(**ppl, k=o["top_k"], **{n: v for n, v in res.info.items() if n != "k"})
    return Outcome(run.path, ppl)


def _hint_pair(pupil: Any, local: Any, cut: bool, o: dict[str, Any]) -> tuple[str, str]:
    """FitNets' (guided, hint) modules: the student's middle block, and the teacher's block it
    was copied from (`cut`), or the one at the same relative depth; either may be named."""
    n_s = num_layers(pupil)
    middle = n_s // 2
    guided = o["guided"] or f"{get_layout(pupil).layers}.{middle}"
    if o["hint"]:
        return guided, o["hint"]
    n_t = num_layers(local.model)
    block = kept_blocks(n_t, o["every"])[middle] if cut else round((middle + 1) * n_t / n_s) - 1
    return guided, f"{get_layout(local.model).layers}.{block}"


def _uld_lm(
    model: str, own: Any, student: str, config: dict[str, Any], o: dict[str, Any], stage: Stage
) -> Outcome | None:
    """`uld`: the teacher `model` and a student cut from `student`, another tokenizer's model,
    trained on text pieces of about `block_size` student tokens."""
    teacher = load_model(model, kind="causal-lm")
    family = load_model(student, kind="causal-lm")
    pupil = layer_dropped(family, o["every"])
    del family
    _say(stage, f"teacher {model}, student cut from {student}; cutting the text into pieces")
    train_texts, test_texts = own[0] if own is not None else _bbc_texts()
    n_train = o["steps"] * o["batch_size"]
    texts = text_blocks(pupil.tokenizer, [train_texts] if own else train_texts, o["block_size"],
                        n_train)  # fmt: skip
    test = held_out_blocks(pupil.tokenizer, [test_texts] if own else test_texts, o["block_size"],
                           o["eval_blocks"])  # fmt: skip
    if len(texts) < o["batch_size"] or len(test) < 1:
        raise ConfigError(f"the text gives {len(texts)} training pieces and {len(test)} perplexity "
                          f"blocks of {o['block_size']} tokens; at least {o['batch_size']} "
                          "(--batch-size) and 1 are needed: give more text or a smaller "
                          "--block-size")  # fmt: skip
    train_cfg = TrainConfig(steps=o["steps"], lr=o["lr"], seed=o["seed"],
                            ckpt_every=o["ckpt_every"], progress=o["progress"])  # fmt: skip
    paths = {"model": source_path(model), "student": source_path(student), "data": o["data"],
             "eval_data": o["eval_data"]}  # fmt: skip
    run = run_on_main("distill-uld", config, inputs=on_disk(paths), root=o["root"],
                      path=o["resume"], cpu=train_cfg.cpu)  # fmt: skip
    with run or nullcontext():
        cfg = ULDConfig(temperature=o["temperature"], batch_size=o["batch_size"])
        _say(stage, f"training the student ({o['steps']} steps)")
        res = run_method("distill/uld", teacher, pupil, texts, cfg=cfg, train_cfg=train_cfg,
                         run=run)  # fmt: skip
        if run is None:
            return None
        ppl = _finish(run, res, pupil.tokenizer, test, stage)
        run.log(**ppl, **res.info)
    return Outcome(run.path, ppl)


def _finish(
    run: Run, res: DistillResult, tokenizer: Any, test: Any, stage: Stage, teacher: Any = None
) -> dict[str, float]:
    """Save the student with its tokenizer, record its loss curve, and measure held-out
    perplexity: the teacher's (when it is in this process, on the same blocks) and the
    student's."""
    with run.output("student") as tmp:
        res.student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    run.history("student_loss", res.history.losses)
    _say(stage, f"perplexity on {len(test)} held-out blocks")
    ppl = {"teacher_ppl": perplexity(teacher, test)} if teacher is not None else {}
    return {**ppl, "student_ppl": perplexity(res.student, test)}


def _bbc_texts() -> tuple[Any, Any]:
    bbc = load_dataset("bbc-news")
    return bbc.train_texts, bbc.test_texts


def cache(
    *, model: str = "smollm2-135m", teacher: Any = None, out: Path, top_k: int = 20,
    data: Path | None = None, eval_data: Path | None = None, steps: int = 40,
    block_size: int = 64, batch_size: int = 4, progress: bool = False, stage: Stage = None,
) -> tuple[Path, int]:  # fmt: skip
    """Save a teacher's top-k answers on the training blocks `lm` cuts with the same options.

    Args:
        model: the teacher (loaded here) when `teacher` is None, else only its tokenizer's
            source; `teacher`: a served handle with `top_logprobs`.
        out: the cache file (written atomically).
        top_k, data, eval_data, steps, block_size, batch_size: as `lm`.

    Returns:
        the file and the number of blocks in it.
    """
    own = _own_text(data, eval_data, block_size, batch_size) if data is not None else None
    local = load_model(model, kind="causal-lm")
    handle = teacher if teacher is not None else narrow(local, "scores")
    blocks, _ = lm_blocks(local.tokenizer, own, block_size, steps * batch_size, 1, batch_size)
    del local  # only its tokenizer was needed when the teacher is served
    _say(stage, f"asking the teacher for its top {top_k} on {len(blocks)} blocks")
    return cache_topk(handle, blocks, top_k, out, batch_size, progress), len(blocks)


def _seq_kd_student(
    teacher: LocalModel, asked: Any, blocks: Any, every: int, batch_size: int,
    train_cfg: TrainConfig, run: Run, stage: Stage = None,
) -> DistillResult:  # fmt: skip
    """Sequence-level KD of a student cut from `teacher` on the continuations of the first half
    of each block by `asked` (a TEXT handle: `teacher` narrowed, or a served model)."""
    half = blocks.shape[1] // 2
    prompts = [teacher.decode(b[:half].tolist()) for b in blocks]
    student = LocalModel(student_from_teacher(teacher.model, every), teacher.tokenizer, "student")
    cfg = SeqKDConfig(max_new_tokens=half, batch_size=batch_size)
    _say(stage, f"the teacher continues {len(prompts)} prompts, then the student trains "
                f"({train_cfg.steps} steps)")  # fmt: skip
    return run_method("distill/seq_kd", asked, student, prompts, cfg=cfg, train_cfg=train_cfg,
                      run=run)  # fmt: skip
