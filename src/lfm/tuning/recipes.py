"""What the `lfm tuning` commands run, as documented library functions.

    from lfm.tuning import recipes
    recipes.classify("lora", "smollm2-135m", shots=16, steps=30)    # lfm tuning train
    recipes.classify("lora", "smollm2-135m", data="mine.jsonl")       # ... --data mine.jsonl
    recipes.sft("lora", "smollm2-135m", steps=30)                     # lfm tuning sft
    recipes.bbt("smollm2-135m", budget=200)                           # lfm tuning bbt
    recipes.prompt_search("smollm2-135m", iterations=10)              # lfm tuning prompt-search
    recipes.opro("smollm2-135m", proposer="smollm2-135m", steps=4)   # lfm tuning opro
    recipes.augment("knn_lm", "smollm2-135m")                         # lfm tuning augment
    recipes.predict("runs/…-tune-lora", data="test.jsonl")            # lfm tuning classify

Each loads its model and data, runs one tuner by name, saves what was learnt (`TuneResult.save`)
into a run directory (`runs/<stamp>-<name>/`, with the manifest: config, versions, metrics, the
SHA-256 of the model's file or folder and of the data file given, and the runs that made them) and
returns a JSON-ready summary. The config recorded in the manifest is the recipe's options as plain
data, so `resume=` finds the same config and continues a checkpointed run (`bbt`, `prompt_search`
and `opro`: by replaying the evaluations they logged). The black-box recipes
take a model name (loaded and narrowed to the method's level) or a handle (a served model);
`predict` classifies again with what a run saved (`lfm.tuning.saved`). The training recipes keep
their learning curves in the manifest's `history` and draw them as `curves.png` in the run.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lfm.access import Access, LocalModel, access_of, narrow
from lfm.assets import TextDataset, load_dataset, load_model
from lfm.assets.labelled import read_labelled, read_texts
from lfm.core.io import write_text
from lfm.core.runs import read_manifest
from lfm.core.train import TrainConfig, run_on_main
from lfm.errors import ConfigError
from lfm.registry import MethodSpec, get
from lfm.runs import Run, on_disk
from lfm.tuning.adapters import is_causal
from lfm.tuning.proposer import DEFAULT_PROPOSER, load_proposer
from lfm.tuning.replay import ReplayLog
from lfm.tuning.results import TunedModel, TuneResult
from lfm.tuning.saved import (
    black_box_handle,
    load_classifier,
    saved_access,  # noqa: F401  (part of this API)
    saved_scores,  # noqa: F401  (part of this API)
)
from lfm.tuning.sft import load_instructions, render
from lfm.tuning.tasks import (
    BBC_LABEL_WORDS,
    BBC_TEMPLATE,
    Instructions,
    TextClassification,
    Verbalizer,
    bbc_verbalizer,
    few_shot,
    held_out,
    labelled_dataset,
    labelled_verbalizer,
)
from lfm.tuning.trainer import HEAD_LR

TASKS = ("bbc",)  # classification tasks of `classify`: BBC News, 5 topics
_PACKAGED_INSTRUCTIONS = Path(__file__).parent / "data" / "instructions.jsonl"  # `sft`'s default


def _spec(method: str, access: Access | None = None, command: str = "") -> MethodSpec:
    """The tuning method `method` (hyphens read as underscores), refused if another command runs it."""
    spec = get(method, area="tuning")
    if access is not None and spec.access != access:
        raise ConfigError(f"{spec.name} is not run by `lfm tuning {command}`: use `{spec.cli}`")
    return spec


def _local(model: str, what: str) -> LocalModel:
    """A language model or encoder with its tokenizer, or a one-line refusal."""
    handle = load_model(model)
    if not isinstance(handle, LocalModel):
        raise ConfigError(f"{what} needs a language model or a text encoder, not {model!r}")
    return handle


def _run_kwargs(spec: MethodSpec, cfg: Any, steps: int, lr: float, tcfg: dict, **options: Any):
    """The config and keyword arguments of a trainer: `train_cfg` for a gradient tuner; a tuner
    without a training loop (MeZO) takes its steps and learning rate from its config, and shows
    its own progress bar."""
    params = inspect.signature(spec.impl).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "train_cfg" in params:
        options["train_cfg"] = TrainConfig.build(steps=steps, lr=lr or cfg.lr, **tcfg)
    else:
        cfg = cfg.replace(steps=steps, lr=lr or cfg.lr)
        if "progress" in params:
            options["progress"] = True
    return cfg, {k: v for k, v in options.items() if takes_any or k in params}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def classification_data(
    handle: LocalModel, task: str | TextDataset, shots: int, eval_per_class: int, max_chars: int,
    seed: int,
) -> tuple[TextClassification, TextClassification]:  # fmt: skip
    """The few-shot train set (`shots` per class, drawn by `seed`) and the fixed held-out set (the
    first `eval_per_class` held-out examples of each class; all for 0): label words for a causal
    LM, raw texts for an encoder's new head, cut to `max_chars`.

    `task` is a bundled task's name (`TASKS`) or a data set of one's own (`labelled_data`), whose
    label strings are the label words under `DATA_TEMPLATE`.
    """
    if shots < 1:
        raise ConfigError(f"shots must be at least 1, not {shots}")
    if isinstance(task, str):
        _check_task(task)
    data = load_dataset("bbc-news") if isinstance(task, str) else task
    texts, y = few_shot(data, shots, seed)
    ev_texts, ev_y = held_out(data, eval_per_class)
    if is_causal(handle.model):
        verb = (bbc_verbalizer if isinstance(task, str) else labelled_verbalizer)(
            data.classes, max_chars
        )
        return TextClassification(texts, y, verb), TextClassification(ev_texts, ev_y, verb)
    n = len(data.classes)
    cut = [t[:max_chars] for t in texts]
    return (TextClassification(cut, y, n_classes=n),
            TextClassification([t[:max_chars] for t in ev_texts], ev_y, n_classes=n))  # fmt: skip


def labelled_data(
    path: str | Path, text_field: str = "text", label_field: str = "label",
    holdout: float = 0.2, shots: int = 1,
) -> TextDataset:  # fmt: skip
    """A classification file of one's own (JSON lines or CSV; `lfm.assets.labelled.read_labelled`)
    split into training and held-out examples (`labelled_dataset`: `holdout` a fraction of each
    class or every k-th example), each class with at least `shots` to train on."""
    texts, labels = read_labelled(path, text_field, label_field)
    return labelled_dataset(Path(path).name, texts, labels, holdout, shots)


def classify(
    method: str = "lora", model: str = "smollm2-135m", *, task: str = "bbc", shots: int = 16,
    steps: int = 30, batch_size: int = 4, lr: float = 0.0, head_lr: float = HEAD_LR,
    grad_accum: int = 1, eval_per_class: int = 10, eval_every: int = 0, max_chars: int = 400,
    seed: int = 0, ckpt_every: int = 0, threads: int | None = None, root: str | Path = "runs",
    resume: str | Path | None = None, data: str | Path | None = None, text_field: str = "text",
    label_field: str = "label", holdout: float = 0.2,
) -> dict[str, Any] | None:  # fmt: skip
    """Few-shot classification with a trained tuning method, into a run directory.

    Loads the model (a causal LM classifies through label words, an encoder through a new head)
    and BBC News, or the JSON-lines or CSV file `data` (its `text_field` and `label_field`; the
    label strings are the label words; `holdout` of each class held out, see `labelled_data`),
    draws `shots` training examples per class, trains `method` (its paper defaults; `lr` 0 keeps
    its paper learning rate), evaluates on the first `eval_per_class` held-out examples of each
    class before (label words only) and after, and saves the adapter or weights as `tuned/` in
    the run directory; the manifest records the data file's SHA-256 and the fields read.
    `resume` continues that run from its checkpoint (`ckpt_every`). Returns the summary, or None
    on the non-main processes of a launch.
    """
    spec = _spec(method, Access.WEIGHTS, "train")
    config = {"method": spec.name, "model": model, "task": None if data else task,
              "shots": shots, "steps": steps, "batch_size": batch_size, "lr": lr,
              "head_lr": head_lr, "grad_accum": grad_accum, "eval_per_class": eval_per_class,
              "eval_every": eval_every, "max_chars": max_chars, "seed": seed,
              "ckpt_every": ckpt_every, **_data_options(data, text_field, label_field, holdout)}  # fmt: skip
    # the task or file is checked before the model loads
    source = labelled_data(data, text_field, label_field, holdout, shots) if data else task
    if isinstance(source, str):
        _check_task(source)
    _threads(threads)
    handle = _local(model, "classification")
    dataset = load_dataset("bbc-news") if isinstance(source, str) else source
    train, ev = classification_data(handle, source, shots, eval_per_class, max_chars, seed)
    tcfg = {"grad_accum": grad_accum, "eval_every": eval_every, "seed": seed,
            "ckpt_every": ckpt_every}  # fmt: skip
    cfg, kwargs = _run_kwargs(spec, spec.config(), steps, lr, tcfg, eval_data=ev, seed=seed,
                              batch_size=batch_size, head_lr=head_lr, inplace=True)  # fmt: skip
    inputs = on_disk({"model": _source(model), "data": data})
    run = run_on_main(f"tune-{spec.name}", config, inputs=inputs, root=root, path=resume)
    with run or nullcontext():
        if run is not None:  # what `predict` names the classes by; the split the accuracy is on
            run.log(classes=list(dataset.classes), split={"train": len(dataset.train_texts),
                    "held_out": len(dataset.test_texts), "evaluated": len(ev.texts)})  # fmt: skip
        result = spec.fn(handle, train, cfg, run=run, **kwargs)
        if run is not None:
            _save(run, "tuned", result)
            _train_curves(run, result, steps)
    if run is None:
        return None  # another process of a multi-process launch; the main one reports
    m = result.metrics
    return {"method": spec.name, "model": model, "zero_shot_acc": m.get("zero_shot_acc"),
            "acc": m.get("acc"), "trainable_parameters": m.get("trainable_parameters"),
            "held_out": len(ev.texts), "run": str(run.path)}  # fmt: skip


def _train_curves(run: Run, result: TuneResult, steps: int) -> None:
    """The training loss per step and, with two points or more, the held-out accuracy: zero-shot
    at step 0, then each evaluation (a tuner without them: its final accuracy at the last step)."""
    run.history("loss", result.history)
    m = result.metrics
    evals = result.evals if isinstance(result, TunedModel) else []
    points = [(0, m["zero_shot_acc"])] if m.get("zero_shot_acc") is not None else []
    points += [(e["step"], e["acc"]) for e in evals if "acc" in e] or (
        [(steps, m["acc"])] if m.get("acc") is not None else []
    )
    if len(points) >= 2:
        run.history("acc", [a for _, a in points], steps=[s for s, _ in points])


def _data_options(
    data: str | Path | None, text_field: str, label_field: str, holdout: float
) -> dict[str, Any]:
    """The options of a data file as the manifest records them (none for a bundled task)."""
    if data is None:
        return {}
    return {"data": str(data), "text_field": text_field, "label_field": label_field,
            "holdout": holdout}  # fmt: skip


def sft(
    method: str = "lora", model: str = "smollm2-135m", *, data: str | Path | None = None,
    steps: int = 30, batch_size: int = 4, lr: float = 0.0, seed: int = 0,
    threads: int | None = None, root: str | Path = "runs", resume: str | Path | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Instruction tuning (loss on the responses only) of a causal LM, into a run directory.

    `data` is a JSONL file of {"prompt", "response"} objects (default: the packaged set). Saves
    `tuned/` and logs the final loss and the tuned model's answer to the first prompt.
    """
    spec = _spec(method, Access.WEIGHTS, "sft")
    config = {"method": spec.name, "model": model, "data": str(data) if data else None,
              "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}  # fmt: skip
    _threads(threads)
    rows = Instructions(load_instructions(data))  # a bad file is refused before the model loads
    handle = load_model(model, kind="causal-lm")
    cfg, kwargs = _run_kwargs(spec, spec.config(), steps, lr, {"seed": seed}, seed=seed,
                              batch_size=batch_size, inplace=True)  # fmt: skip
    inputs = on_disk({"model": _source(model), "data": data or _PACKAGED_INSTRUCTIONS})
    run = run_on_main(f"sft-{spec.name}", config, inputs=inputs, root=root, path=resume)
    with run or nullcontext():
        result = spec.fn(handle, rows, cfg, run=run, **kwargs)
        if run is None:
            return None  # another process of a multi-process launch; the main one saves
        _save(run, "tuned", result)
        run.history("loss", result.history)
        first = rows.rows[0]["prompt"]
        answer = result.handle().generate([render(handle.tokenizer, first)], max_new_tokens=20)[0]
        run.log(final_loss=result.history[-1], sample=answer)
    return {"method": spec.name, "first_loss": result.history[0],
            "final_loss": result.history[-1], "prompt": first, "answer": answer,
            "run": str(run.path)}  # fmt: skip


def _save(run: Run, name: str, result: TuneResult) -> None:
    with run.output(name) as tmp:
        result.save(tmp)


def _few_shot(
    shots: int, seed: int, max_chars: int, data: dict[str, Any] | None
) -> tuple[TextClassification, tuple[str, ...]]:
    """`shots` examples per class of BBC News, or of a data file (`data`: `labelled_data`'s
    options), through label words; and the class names."""
    if data:
        ds = labelled_data(data["data"], data["text_field"], data["label_field"],
                           data["holdout"], shots)  # fmt: skip
        verb = labelled_verbalizer(ds.classes, max_chars)
        return TextClassification(*few_shot(ds, shots, seed), verb), ds.classes
    bbc = load_dataset("bbc-news")
    verb = Verbalizer(BBC_TEMPLATE, tuple(BBC_LABEL_WORDS[c] for c in bbc.classes), max_chars)
    return TextClassification(*few_shot(bbc, shots, seed), verb), bbc.classes


# the curve of each search: the recorded value at its start, then after each iteration
_SEARCH_CURVES = {"bbt": ("best_loss", "start_loss", "CMA-ES iteration"),
                  "prompt_search": ("best_score", "start_score", "search step"),
                  "opro": ("best_score", "start_score", "step (0: APE)")}  # fmt: skip


def _black_box_run(
    method: str, model: str | Any, config: dict[str, Any], cfg: Any, shots: int, seed: int,
    max_chars: int, root: str | Path, progress: bool, resume: str | Path | None = None,
    proposer: str | Any | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run a black-box search into a run directory; `proposer` (a model name or handle) is
    loaded after the data and the target, and passed to the method."""
    spec = _spec(method)
    own = {k: config[k] for k in ("data", "text_field", "label_field", "holdout") if k in config}
    if resume is not None:
        read_manifest(resume)  # one line when it is not a run directory
    # a bad file is refused before the model loads
    task, classes = _few_shot(shots, seed, max_chars, own)
    handle = black_box_handle(model, spec.access)
    extra = {} if proposer is None else {"proposer": load_proposer(proposer)}
    inputs = on_disk({"model": _source(model), "data": own.get("data"),
                      "proposer": _source(proposer) if proposer is not None else None})  # fmt: skip
    with Run(spec.name, {**config, "config": cfg.to_dict()}, inputs=inputs, root=root,
             path=resume) as run:  # fmt: skip
        run.log(classes=list(classes))
        result = spec.fn(handle, task, cfg, seed=seed, progress=progress, log=ReplayLog(run),
                         **extra)  # fmt: skip
        _save(run, "result", result)
        record = result.record()
        run.log(**{k: v for k, v in record.items() if k.endswith(("loss", "score"))})
        name, start, xlabel = _SEARCH_CURVES[spec.name]
        curve = [record[start], *result.history]
        run.history(name, curve, steps=list(range(len(curve))), xlabel=xlabel)
    return {**record, "run": str(run.path)}


def bbt(
    model: str | Any = "smollm2-135m", *, shots: int = 16, budget: int = 8000, n_tokens: int = 50,
    dim: int = 500, max_chars: int = 1200, seed: int = 0, root: str | Path = "runs",
    data: str | Path | None = None, text_field: str = "text", label_field: str = "label",
    holdout: float = 0.2, resume: str | Path | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Black-Box Tuning on BBC News few-shot (or on the training part of a data file, as in
    `classify`) through EMBEDDINGS access, into a run directory.

    `model` is a model name (loaded and narrowed to EMBEDDINGS) or a handle (a `RemoteModel`).
    The soft prompt, its z, the projection's seed and shape are saved as
    `result/prompt.safetensors` (`lfm.tuning.bbt.load_prompt`; `saved_scores` classifies with
    it). The best loss after each CMA-ES iteration is the run's curve; `progress` shows a bar over
    the evaluations (stderr). Every evaluation is logged in the run directory
    (`evaluations.json`, `lfm.tuning.replay`); `resume` (a run directory started with the same
    options) runs CMA-ES again from its seed, replays the logged evaluations instead of calling
    the model, and goes on to the result of an uninterrupted run. Returns the result's record and
    the run directory.
    """
    from lfm.tuning.bbt import BBTConfig

    cfg = BBTConfig.build(budget=budget, n_tokens=n_tokens, intrinsic_dim=dim)
    config = {"model": _name(model), "shots": shots, "max_chars": max_chars, "seed": seed,
              **_data_options(data, text_field, label_field, holdout)}  # fmt: skip
    return _black_box_run("bbt", model, config, cfg, shots, seed, max_chars, root, progress,
                          resume)  # fmt: skip


def prompt_search(
    model: str | Any = "smollm2-135m", *, shots: int = 16, iterations: int = 10,
    candidates: int = 5, max_chars: int = 1200, seed: int = 0, root: str | Path = "runs",
    data: str | Path | None = None, text_field: str = "text", label_field: str = "label",
    holdout: float = 0.2, resume: str | Path | None = None, progress: bool = True,
    proposer: str | Any | None = None,
) -> dict[str, Any]:  # fmt: skip
    """GrIPS-style discrete prompt search on BBC News few-shot (or a data file's training part)
    through SCORES access.

    The phrase pool names the task's label words and holds generic phrases; `proposer` (a model
    name or folder, loaded locally, or a handle with `generate`) adds phrases it writes from
    demonstrations. The template found is saved as `result/template.json`
    (`lfm.tuning.prompt_search.load_template`; `saved_scores` classifies with it). The best score
    after each step is the run's curve; `progress` prints one line per step (stderr). Every
    scored candidate is logged in the run directory, and `resume` replays them as `bbt` does.
    """
    from lfm.tuning.prompt_search import PromptSearchConfig

    cfg = PromptSearchConfig.build(iterations=iterations, candidates=candidates)
    config = {"model": _name(model), "shots": shots, "max_chars": max_chars, "seed": seed,
              **({"proposer": _name(proposer)} if proposer is not None else {}),
              **_data_options(data, text_field, label_field, holdout)}  # fmt: skip
    return _black_box_run("prompt_search", model, config, cfg, shots, seed, max_chars, root,
                          progress, resume, proposer)  # fmt: skip


def opro(
    model: str | Any = "smollm2-135m", *, proposer: str | Any = DEFAULT_PROPOSER,
    shots: int = 16, steps: int = 4, candidates: int = 4, max_chars: int = 1200, seed: int = 0,
    root: str | Path = "runs", data: str | Path | None = None, text_field: str = "text",
    label_field: str = "label", holdout: float = 0.2, resume: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Instruction optimisation (APE's step, then `steps` OPRO steps of `candidates` proposals)
    on BBC News few-shot (or a data file's training part) through TEXT access.

    `model` is the target: a model name (loaded and narrowed to TEXT) or a handle (a
    `RemoteModel` at TEXT). `proposer` writes the instructions: a model name or folder, loaded
    locally (its chat template used when it has one), or a handle with `generate`. The best
    instruction, its score and every instruction scored are saved as `result/instruction.json`
    (`lfm.tuning.opro.load_instruction`; `predict` classifies with it). The best score after
    each step is the run's curve; `progress` prints one line per step (stderr). Every scored
    instruction is logged in the run directory, and `resume` replays them as `bbt` does (the
    proposer runs again, seeded, and writes the same proposals).
    """
    from lfm.tuning.opro import OproConfig

    cfg = OproConfig.build(steps=steps, candidates=candidates)
    config = {"model": _name(model), "proposer": _name(proposer), "shots": shots,
              "max_chars": max_chars, "seed": seed,
              **_data_options(data, text_field, label_field, holdout)}  # fmt: skip
    return _black_box_run("opro", model, config, cfg, shots, seed, max_chars, root, progress,
                          resume, proposer)  # fmt: skip


def predict(
    run: str | Path, *, data: str | Path | None = None, text: str | None = None,
    text_field: str = "text", label_field: str = "label", model: str | Any | None = None,
    out: str | Path | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Classify with what a tuning run saved (`lfm.tuning.saved.load_classifier`): the texts of
    the JSON-lines or CSV file `data` (read as `--data` is read; when its lines have
    `label_field`, their labels give the accuracy) or the one `text`.

    `model` (None: the run's) is a model name or folder, or for a BBT, prompt-search or OPRO
    run a handle such as a served model. With `out`, writes one JSON line per text: the text, its
    prediction, the class scores (null for -inf) and its label. An OPRO run's answer that names
    no label word is predicted as None and counts as wrong. Returns the run, method, classes, the number of
    texts and the accuracy (None without labels); for one `text`, its prediction and scores.
    """
    if (data is None) == (text is None):
        raise ConfigError("give the texts to classify: a data file (--data) or one text (--text)")
    texts, labels = ([text], None) if data is None else read_texts(data, text_field, label_field)
    clf = load_classifier(run, model)
    gold = None if labels is None else _gold(labels, clf, data)
    scores = clf.scores(texts, "classify" if progress else None)
    # a row with no finite score names no class (an OPRO answer without a label word): wrong
    pred = torch.where(scores.isfinite().any(-1), scores.argmax(-1), -1)
    names = [clf.classes[int(p)] if p >= 0 else None for p in pred]
    acc = None if gold is None else float((pred == gold).float().mean())
    if out is not None:
        rows = [{"text": t, "prediction": names[i], "scores": _finite(s),
                 **({} if labels is None else {"label": labels[i]})}
                for i, (t, s) in enumerate(zip(texts, scores, strict=True))]  # fmt: skip
        write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"run": str(run), "method": clf.method, "classes": list(clf.classes),
               "texts": len(texts), "acc": acc, "out": None if out is None else str(out)}  # fmt: skip
    if text is not None:
        summary.update(prediction=names[0], scores=scores[0].tolist())
    return summary


def _finite(row: torch.Tensor) -> list[float | None]:
    """A row of scores as JSON can hold it: -inf (a class an answer did not name) as null."""
    return [v if math.isfinite(v) else None for v in row.tolist()]


def _gold(labels: Sequence[str], clf: Any, data: str | Path | None) -> torch.Tensor:
    """The class index of each label, or a one-line error naming one that is no class."""
    idx = [clf.index(label) for label in labels]
    if None in idx:
        bad = labels[idx.index(None)]
        raise ConfigError(f"{data}: label {bad!r} is not a class of the run "
                          f"({', '.join(clf.classes)})")  # fmt: skip
    return torch.tensor(idx)


def _name(model: str | Any) -> str:
    return model if isinstance(model, str) else str(getattr(model, "name", type(model).__name__))


def _source(model: str | Any) -> Path | None:
    """The file or folder a model is read from, for the run's input hashes (None: a handle, such
    as a served model, or a hub name)."""
    from lfm.assets.models import source_path

    return source_path(model) if isinstance(model, str | Path) else None


def augment(
    method: str = "knn_lm", model: str | Any = "smollm2-135m", *,
    corpus: str | Path | None = None, store: int = 100, eval_texts: int = 15, chars: int = 800,
    prefix_chars: int = 200, embedder: str = "minilm", threads: int | None = None,
    root: str | Path = "runs", progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Retrieval augmentation (kNN-LM or REPLUG) and the perplexity it gives on held-out text.

    The datastore (kNN-LM) or documents (REPLUG) are the lines of `corpus`, else the first `store`
    BBC News training articles; each is cut to `chars` characters. The perplexity is that of the
    first `eval_texts` BBC test articles after their first ~`prefix_chars` characters, under the
    model alone and augmented (only articles whose first 100 characters are in no document).
    Saves the datastore or documents as `augmented/`; `embedder` (REPLUG's retriever) is
    `minilm` (mean-pooled `minilm-l6`) or `chars` (a bag of characters, no asset).

    `model` is a model name (loaded, then narrowed) or a handle that gives the method's access
    (a served model at SCORES for REPLUG, at HIDDEN for kNN-LM: `lfm serve --access hidden`). `progress` shows bars (stderr) over the datastore's texts and the scored articles.
    """
    from lfm.tuning.retrieval import char_embedder, minilm_embedder

    spec = _spec(method, command="augment")
    kind = spec.extras.get("data")
    if kind is None:
        raise ConfigError(f"{spec.name} is not a retrieval method: use `{spec.cli}`")
    if embedder not in ("minilm", "chars"):
        raise ConfigError(f"unknown embedder {embedder!r}; choose minilm or chars")
    if eval_texts < 1 or chars < 1:
        raise ConfigError("eval_texts and chars must be at least 1")
    _enough_access(spec, model)
    _threads(threads)
    base, scorer = _augment_handles(model, spec.access)
    data = load_dataset("bbc-news")
    test = [t[:chars] for t in data.test_texts[:eval_texts]]
    docs = _corpus(corpus, data, store, chars, {t[:100] for t in test})
    options = {"embed": char_embedder if embedder == "chars" else minilm_embedder(),
               "progress": progress}  # fmt: skip
    params = inspect.signature(spec.impl).parameters
    config = {"method": spec.name, "model": _name(model), "corpus": str(corpus) if corpus else None,
              "store": store, "eval_texts": eval_texts, "chars": chars,
              "prefix_chars": prefix_chars, "embedder": embedder}  # fmt: skip
    inputs = on_disk({"model": _source(model), "corpus": corpus})
    with Run(f"augment-{spec.name}", config, inputs=inputs, root=root) as run:
        result = spec.fn(base, kind(docs), **{k: v for k, v in options.items() if k in params})
        out = {"method": spec.name, "entries": result.metrics["entries"],
               **perplexities(scorer, result.handle, test, prefix_chars,
                              "perplexity" if progress else None)}  # fmt: skip
        _save(run, "augmented", result)
        run.log(**out)
    return {**out, "run": str(run.path)}


def _enough_access(spec: MethodSpec, model: str | Any) -> None:
    """Refuse, before any work, a handle that gives less than the method needs."""
    if isinstance(model, str | Path):
        return
    got = access_of(model)
    card = model.info() if hasattr(model, "info") else {}  # a served model says what it gives
    if "lfm_access" in card:
        got = min(got, Access.parse(card["lfm_access"]))
    if got < spec.access:
        why = f"{spec.name} needs {spec.access.name} access and {_name(model)} gives {got.name}"
        if spec.access == Access.HIDDEN:
            why += "; serve the model with `lfm serve --access hidden`, or run it locally (--model)"
        raise ConfigError(why)


def _augment_handles(model: str | Any, level: Access) -> tuple[Any, Any]:
    """The handle the method builds on (at `level`) and the SCORES handle the perplexity of the
    plain model is measured through: a loaded model narrowed twice, or a handle used as it is."""
    if not isinstance(model, str | Path):
        return model, model
    local = load_model(str(model), kind="causal-lm")
    return narrow(local, level), narrow(local, Access.SCORES)


def _corpus(path: str | Path | None, data: Any, n: int, chars: int, held: set[str]) -> list[str]:
    """Lines of `path`, else the first `n` BBC training articles that repeat no held-out one."""
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read the corpus {path}: {e}") from None
        return [t[:chars] for t in lines if t.strip()]
    return [t[:chars] for t in data.train_texts if t[:100] not in held][:n]


def perplexities(
    base: Any, augmented: Any, texts: list[str], prefix_chars: int, desc: str | None = None
) -> dict[str, Any]:
    """Perplexity of each text after its prefix (cut at a space), under `base` and `augmented`,
    scored one text at a time (`desc`: a progress bar over them)."""
    cut = [max(t.rfind(" ", 0, prefix_chars), 1) for t in texts]
    pairs = [(t[:c], t[c:]) for t, c in zip(texts, cut, strict=True)]
    n = sum(len(base.encode(x + y)) - len(base.encode(x)) for x, y in pairs)
    lm = aug = 0.0
    for x, y in tqdm(pairs, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        lm += float(base.score([x], [y]).sum())
        aug += float(augmented.score([x], [y]).sum())
    return {
        "tokens": n,
        "lm_ppl": round(math.exp(-lm / n), 3),
        "augmented_ppl": round(math.exp(-aug / n), 3),
    }
