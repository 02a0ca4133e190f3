"""What the `lfm reuse` commands run, as library functions a Python user calls the same way.

    merge_plan("plan.yaml", "merged/")                           # lfm reuse merge
    statistics("gram", "smollm2-135m", "texts.txt", "g.safetensors")   # lfm reuse stats
    rebasin_files("a.safetensors", "b.safetensors", "b_aligned.safetensors")  # lfm reuse rebasin
    upcycle_plan("moe.yaml", "moe/")                             # lfm reuse moe
    classify_texts(["lm-a", "lm-b"], method="ensemble_vote", dataset="bbc-news")  # lfm reuse ensemble

Each raises an `LfmError` (one line) for anything a user can get wrong: a bad plan, an unknown
method, a missing or unreadable file, models that do not fit together.

`merge_plan`, `statistics`, `rebasin_files` and `upcycle_plan` write a run directory under `root`
(`runs/<stamp>-merge-<method>/`, `...-stats-<kind>/`, `...-rebasin/`, `...-moe/`): its manifest holds the
options and resolved config as plain data, the SHA-256 of every file or folder read (the plan, the
models, the base, statistics files, texts; one inside another run directory names that run as a
parent) and where the output was written, and is marked `done` once the output is complete,
`failed: ...` otherwise. The output stays where it was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lfm import registry
from lfm.access import module_of
from lfm.assets.labelled import read_labelled
from lfm.core.io import save_tensors, write_json
from lfm.errors import LfmError
from lfm.reuse.contract import ENSEMBLE
from lfm.reuse.ensemble import LabelWords, mixture_weights
from lfm.reuse.moe import MoePlan, Upcycled, plan_folders, upcycle_folder
from lfm.reuse.plan import MergePlan, check_plan
from lfm.reuse.rebasin import (
    RebasinConfig,
    align_pair,
    chain_spec_from_state_dict,
    check_same_layout,
    read_state_dict,
    to_device,
)
from lfm.reuse.stats import save_fisher, save_gram
from lfm.runs import Run, on_disk

TEMPLATE = "{text}\nTopic:"  # the label word follows "Topic:"


def merge_plan(
    plan: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    root: str | Path = "runs",
    allow_nonfinite: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[MergePlan, Path, Path]:
    """Merge the models a YAML plan names (lfm's format or a mergekit file) into `out`.

    Args:
        plan: the plan file; relative model paths are read from its folder.
        out: the output folder (a loadable Hugging Face folder, written in one rename).
        overwrite: replace an existing `out`.
        progress: show a progress bar over tensors.
        root: where the run directory is created (`<root>/<stamp>-merge-<method>/`).
        allow_nonfinite: merge NaN and infinite values instead of refusing them (in the models
            and in the merged tensors).
        device: where the merge arithmetic runs (`merge_models`: each tensor's inputs moved
            there, the result written from the CPU); None: the process placement's device when
            one was chosen (`--device`), else the CPU. A device is recorded in the run's options.
        dtype: the dtype the output's floating tensors are written in (float32, bfloat16 or
            float16; `merge_models`); None: a mergekit plan's `out_dtype`, else the template's.
            Checked with the plan (a `dtype` that differs from the plan's `out_dtype` is one of
            its problems); the dtype written is recorded in the run's options.

    Returns:
        The plan as read, the output folder and the run directory.
    """
    from lfm.reuse.driver import dtype_name, kernel_spec
    from lfm.reuse.engine import chosen_device
    from lfm.reuse.lora import split_plus

    at = chosen_device(device)  # a device this machine lacks: one line, before the run

    # the whole plan — schema, method, parameters, paths, configs, tensor headers — before the
    # run and before any weight is read; every problem at once
    merge = check_plan(plan, dtype)
    cast = merge.output_dtype(dtype)
    spec = kernel_spec(merge.method)
    cfg = spec.resolve(merge.parameters).to_dict()
    options = {"plan": str(plan), "method": spec.name, "base": merge.base, "models": merge.models,
               "weights": merge.weights, "config": cfg, "max_shard_size": merge.max_shard_size,
               "on_missing": merge.on_missing, "allow_nonfinite": allow_nonfinite,
               "out": str(out)}  # fmt: skip
    if at is not None:
        options["device"] = str(at)
    if cast is not None:
        options["dtype"] = dtype_name(cast)
    files: dict[str, Any] = {"plan": plan, "base": merge.base}
    for i, model in enumerate(merge.models):
        plus = split_plus(model)  # mergekit's `base+adapter`: both are read
        files.update({f"model{i}": model} if plus is None else
                     {f"model{i}_base": plus[0], f"model{i}": plus[1]})  # fmt: skip
    files.update({f"stats{i}": p for i, p in enumerate(cfg.get("stats") or ())})
    files["coefficients"] = cfg.get("coefficients")
    with Run(f"merge-{spec.name}", options, inputs=on_disk(files), root=root) as run:
        path = merge.run(out, overwrite=overwrite, progress=progress,
                         allow_nonfinite=allow_nonfinite, device=at, dtype=cast)  # fmt: skip
        run.manifest["outputs"].append(str(path))
    return merge, path, run.path


def upcycle_plan(
    plan: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    root: str | Path = "runs",
) -> tuple[MoePlan, Upcycled, Path]:
    """Build the Mixtral MoE a YAML or JSON plan (mergekit-moe's form) describes into `out`.

    Args:
        plan: the plan file; relative model paths are read from its folder.
        out: the output folder (a Hugging Face Mixtral folder, written in one rename).
        overwrite: replace an existing `out`.
        progress: a progress bar over the layers (stderr).
        root: where the run directory is created (`<root>/<stamp>-moe/`).

    Returns:
        The plan as read, what was written and the run directory.
    """
    moe = MoePlan.load(plan)  # the schema, prompts and top-k, before any model is opened
    folders = plan_folders(moe, Path(plan).parent)
    options = {"plan": str(plan), "config": moe.to_dict(), "out": str(out)}
    files = {"plan": plan, **{f"model{i}": f for i, f in enumerate(folders)}}
    with Run("moe", options, inputs=on_disk(files), root=root) as run:
        done = upcycle_folder(moe, out, root=Path(plan).parent, overwrite=overwrite,
                              progress=progress)  # fmt: skip
        run.manifest["outputs"].append(str(done.out))
    return moe, done, run.path


def _lines(path: str | Path) -> list[str]:
    """The non-empty lines of a text file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LfmError(f"cannot read texts from {path}: {e}") from None
    return [t for t in text.splitlines() if t.strip()]


def _lm(model: Any) -> Any:
    """A causal LM handle: loaded when `model` is an asset name, folder or file."""
    if isinstance(model, str | Path):
        from lfm.assets import load_model

        return load_model(model, kind="causal-lm")
    return model


@dataclass
class Computed:
    """What `statistics` wrote: texts used, the statistics file and the run directory."""

    texts: int
    out: Path
    run: Path


def statistics(
    kind: str,
    model: Any,
    texts: str | Path,
    out: str | Path,
    *,
    n: int = 64,
    fisher_kind: str = "sample",
    seed: int = 0,
    root: str | Path = "runs",
    progress: bool = False,
) -> Computed:
    """Save a causal LM's diagonal Fisher (next token) or its layers' input Gram matrices.

    Each line of `texts` is its own batch, so no padding enters the statistics. The file goes
    into a merge plan's `parameters: {stats: [...]}` for `fisher` or `regmean`.

    Args:
        kind: "fisher" or "gram".
        model: an asset name, folder or file, or a white-box LM handle.
        texts: a text file, one example per line.
        out: the statistics file (.safetensors).
        n: use at most this many lines.
        fisher_kind: the Fisher estimator: "sample", "label" or "exact".
        seed: seeds the sampled outputs (Fisher).
        root: where the run directory is created (`<root>/<stamp>-stats-<kind>/`).
        progress: a progress bar over the texts (on stderr).

    Returns:
        The number of texts used, the file and the run directory.
    """
    if kind not in ("fisher", "gram"):
        raise LfmError(f"unknown statistics {kind!r}; choose fisher or gram")
    lines = _lines(texts)[:n]
    if not lines:
        raise LfmError(f"{texts} has no non-empty line to compute statistics on")
    options = {"kind": kind, "model": _name(model), "texts": str(texts), "n": n,
               "fisher_kind": fisher_kind, "seed": seed, "out": str(out)}  # fmt: skip
    files = {"model": _source(model), "texts": texts}
    with Run(f"stats-{kind}", options, inputs=on_disk(files), root=root) as run:
        handle = _lm(model)
        net = module_of(handle, f"lfm reuse stats {kind}")
        ids = [handle.tokenizer(t, return_tensors="pt")["input_ids"] for t in lines]
        batches = [x.to(handle.device) for x in ids]  # where `--device` put the model
        batches = tqdm(batches, desc=f"{kind} statistics", unit="text", disable=not progress)
        if kind == "fisher":
            save_fisher(out, net, batches, kind=fisher_kind, seed=seed)
        else:
            save_gram(out, net, batches)
        run.manifest["outputs"].append(str(out))
    return Computed(len(lines), Path(out), run.path)


def _name(model: Any) -> str:
    """A model as plain data: its name or path, or a handle's display name."""
    return str(model) if isinstance(model, str | Path) else str(getattr(model, "name", model))


def _source(model: Any) -> Path | None:
    """The file or folder a model is read from (None for a handle in memory or a hub name)."""
    from lfm.assets.models import source_path

    return source_path(model) if isinstance(model, str | Path) else None


@dataclass
class Aligned:
    """What `rebasin_files` did: permutations found and hidden units moved."""

    layers: int
    moved: int
    out: Path
    run: Path | None = None  # the run directory


def rebasin_files(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    cfg: RebasinConfig | None = None,
    *,
    root: str | Path = "runs",
    device: str | torch.device | None = None,
) -> Aligned:
    """Permute B's hidden units to match A (weight matching) and save B aligned.

    The permutation spec is read from A's state dict (`chain_spec_from_state_dict`: a chain of
    Linear / Conv2d layers, each optionally followed by a BatchNorm).

    Args:
        a: model A (.safetensors or a model folder), the reference.
        b: model B, to be permuted (same tensors and shapes as A).
        out: B aligned to A, a safetensors file.
        cfg: sweeps at most and the seed of the layer order.
        root: where the run directory is created (`<root>/<stamp>-rebasin/`).
        device: where the weight matching runs: both models' tensors are moved there, and the
            similarity products and the permuting run there (the linear assignments run on the
            CPU, in SciPy); B aligned is written from the CPU, in its stored dtypes. None: the
            process placement's device when one was chosen (`--device`), else the CPU. A device
            is recorded in the run's options.
    """
    from lfm.reuse.engine import chosen_device

    cfg = cfg or RebasinConfig()
    at = chosen_device(device)  # a device this machine lacks: one line, before the run
    options = {"a": str(a), "b": str(b), "config": cfg.to_dict(), "out": str(out)}
    if at is not None:
        options["device"] = str(at)
    with Run("rebasin", options, inputs=on_disk({"a": a, "b": b}), root=root) as run:
        sa, sb = read_state_dict(a), read_state_dict(b)
        spec = chain_spec_from_state_dict(sa)
        check_same_layout([sa, sb], spec)
        if at is not None:
            sa, sb = to_device(sa, at), to_device(sb, at)
        aligned, perms = align_pair(sa, sb, spec, cfg)
        # "pt": the tag transformers expects of weight files
        save_tensors(out, to_device(aligned, torch.device("cpu")), "pt")
        run.manifest["outputs"].append(str(out))
    moved = sum(int((p.cpu() != torch.arange(len(p))).sum()) for p in perms.values())
    return Aligned(len(perms), moved, Path(out), run.path)


@dataclass
class Classification:
    """Ensemble predictions over texts, and accuracies when the texts have gold labels."""

    method: str
    labels: list[str]  # the label words, stripped
    texts: list[str]
    predictions: list[str]
    accuracy: dict[str, float] | None = None  # member name (and "ensemble") -> accuracy
    members: list[Tensor] = field(default_factory=list, repr=False)  # each member's labels

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "labels": self.labels, "predictions": self.predictions}
        return {**out, "accuracy": self.accuracy} if self.accuracy is not None else out


def _texts(
    texts: str | Path | None, dataset: str | None, labels: Sequence[str], n: int,
    data: str | Path | None = None, fields: tuple[str, str] = ("text", "label"),
) -> tuple[list[str], Tensor | None, list[str]]:  # fmt: skip
    """(texts, gold labels or None, label words) from a text file, a labelled file of one's own
    or a labelled text dataset."""
    if sum(x is not None for x in (texts, dataset, data)) != 1:
        raise LfmError("give exactly one of texts (a file), data (a labelled file) or dataset")
    words = [f" {w.strip()}" for w in labels if w.strip()]
    if data is not None:
        return _labelled(data, fields, words, n)
    if texts is not None:
        if not words:
            raise LfmError("classifying a text file needs the label words")
        return _lines(texts)[:n], None, words
    from lfm.assets import load_dataset

    data = load_dataset(dataset)  # type: ignore[arg-type]
    if not hasattr(data, "test_texts"):
        raise LfmError(f"{dataset} is not a labelled text dataset")
    words = words or [f" {c}" for c in data.classes]
    # every class in turn, so a small n still covers all classes
    order = sorted(range(len(data.test_texts)), key=lambda i: (_rank(data.y_test, i), i))[:n]
    return [data.test_texts[i] for i in order], data.y_test[order], words


def _labelled(
    path: str | Path, fields: tuple[str, str], words: list[str], n: int
) -> tuple[list[str], Tensor, list[str]]:
    """The first `n` examples of a JSON-lines or CSV file with their labels; the label words are
    the given ones (one per label, in sorted label order) or else the labels themselves."""
    rows, labels = read_labelled(path, *fields)
    classes = sorted(set(labels))
    if words and len(words) != len(classes):
        raise LfmError(f"{len(words)} label words for the {len(classes)} labels of {path}: "
                       f"{', '.join(classes)}")  # fmt: skip
    gold = torch.tensor([classes.index(x) for x in labels[:n]])
    return rows[:n], gold, words or [f" {c}" for c in classes]


def _rank(labels: Tensor, i: int) -> int:
    """The position of example i among the examples of its class."""
    return int((labels[:i] == labels[i]).sum())


def _prompts(template: str, rows: Sequence[str], max_chars: int) -> list[str]:
    try:
        return [template.format(text=t[:max_chars]) for t in rows]
    except (KeyError, IndexError, ValueError) as e:
        raise LfmError(f"the template may use only {{text}} ({type(e).__name__}: {e})") from None


def _ensemble_config(spec: registry.MethodSpec, weights: Any, space: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"weights": tuple(weights) if weights else None}
    if "space" in spec.config.model_fields:  # ensemble_average's; a vote has none
        cfg["space"] = space
    return cfg


def classify_texts(
    models: Sequence[Any],
    *,
    method: str = "ensemble_average",
    labels: Sequence[str] = (),
    texts: str | Path | None = None,
    dataset: str | None = None,
    template: str = TEMPLATE,
    weights: Sequence[float] | None = None,
    space: str = "prob",
    n: int = 50,
    max_chars: int = 400,
    out: str | Path | None = None,
    progress: bool = False,
    data: str | Path | None = None,
    text_field: str = "text",
    label_field: str = "label",
) -> Classification:
    """Classify texts with an ensemble of LMs by label-word scores (`LabelWords` members).

    Args:
        models: causal LMs: asset names, folders or files, or handles with SCORES access.
        method: a registered ensemble: `ensemble_average` (averaged label-word probabilities)
            or `ensemble_vote` (weighted majority of the members' likeliest words).
        labels: the label words (each scored after a space); default: the dataset's classes.
        texts: a text file, one example per line (needs `labels`); or
        dataset: a labelled text dataset (`bbc-news`): its test split, classes in turn.
        template: the prompt; `{text}` is the example, cut to `max_chars` characters.
        weights: one weight per model (None: equal).
        space: with `ensemble_average`, average probabilities ("prob") or log-probabilities.
        n: use at most this many examples.
        out: also write the predictions (and accuracies) as JSON.
        progress: a progress bar over the members, each loaded and scoring the texts (stderr).
        data: a labelled file of one's own instead (JSON lines, or CSV by its suffix; fields
            `text_field` and `label_field`): the accuracies are printed; the label words are
            `labels` (one per label, in sorted label order) or the labels themselves.
    """
    spec = registry.get(method, area="reuse")
    if spec.shape is not ENSEMBLE:
        raise LfmError(f"{spec.key} is not an ensemble; choose ensemble_average or ensemble_vote")
    if weights is not None and len(weights) != len(models):
        raise LfmError(f"{len(weights)} weights for {len(models)} models")
    mixture_weights(len(models), weights)  # refused before any model is loaded
    rows, gold, words = _texts(texts, dataset, labels, n, data, (text_field, label_field))
    prompts = _prompts(template, rows, max_chars)
    members = []
    for m in tqdm(models, desc="ensemble members", unit="model", disable=not progress):
        members.append(LabelWords(_lm(m), words))
        members[-1].scores(prompts)  # kept by the member: the ensemble below reuses the scores
    result = registry.run(spec.key, members, prompts, cfg=_ensemble_config(spec, weights, space))
    pred = result.argmax(-1) if result.dim() == 2 else result  # log-probabilities or labels
    names = [w.strip() for w in words]
    own = [m.predict(prompts) for m in members]  # scored once: the members keep their scores
    res = Classification(spec.name, names, rows, [names[i] for i in pred.tolist()], members=own)
    if gold is not None:
        keys = [str(m) if isinstance(m, str | Path) else m.name for m in models]
        res.accuracy = {
            k: float((p == gold).float().mean()) for k, p in zip(keys, own, strict=True)
        }
        res.accuracy["ensemble"] = float((pred == gold).float().mean())
    if out is not None:
        write_json(out, res.to_dict())
    return res
