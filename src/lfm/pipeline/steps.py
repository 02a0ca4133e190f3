"""What each kind of pipeline step takes, checks before anything loads, and runs.

A step runs a registered method (`tuning/lora`, `edit/rome`, `reuse/ties`, `distill/kd` ...): how
it is called follows from the method's area shape. Or it runs one of the pipeline steps here:
training a classifier, merging an adapter into its base, applying a patch, computing statistics,
and the evaluations whose figures make the final table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lfm import registry
from lfm.access import Access, narrow
from lfm.core.train import TrainConfig, train
from lfm.distill.vision import accuracy
from lfm.errors import ConfigError, LfmError, did_you_mean
from lfm.pipeline import data as D
from lfm.pipeline.artifacts import (
    Artifact,
    build_classifier,
    classifier_handle,
    load_classifier,
    save_classifier,
)
from lfm.pipeline.spec import StepSpec

Inputs = dict[str, list[Artifact]]


@dataclass
class Context:
    """What a running step gets: its spec, its inputs and a folder for its output."""

    step: StepSpec
    inputs: Inputs
    out: Path  # a temporary folder: renamed into the run directory when the step succeeds
    metrics: dict[str, Any] = field(default_factory=dict)

    def one(self, key: str) -> Artifact:
        return self.inputs[key][0]


@dataclass(frozen=True)
class Kind:
    """A kind of step: its inputs (field -> accepted artifact kinds), its output and its run."""

    name: str
    needs: dict[str, tuple[str, ...]]  # required inputs
    output: str  # the artifact kind it makes ("metrics" for evaluations)
    execute: Callable[[Context], str]  # runs; returns the output's path relative to `out`
    optional: dict[str, tuple[str, ...]] = field(default_factory=dict)
    data: str | None = None  # the data spec kind it reads (`lfm.pipeline.data.KINDS`)
    data_required: bool = True  # False: `data` may be left out (an editor given `requests`)
    access: Access = Access.WEIGHTS  # what it needs of its model inputs
    check: Callable[[StepSpec], list[str]] = lambda step: []  # more checks before loading
    extra: tuple[str, ...] = ()  # other step fields it reads (requests, student, config, train)

    @property
    def evaluates(self) -> bool:
        return self.output == "metrics"


STEPS: dict[str, Kind] = {}


def _step(kind: Kind) -> Kind:
    STEPS[kind.name] = kind
    return kind


def _config(schema: type[BaseModel], step: StepSpec) -> list[str]:
    try:
        schema.model_validate(step.config)
    except ValidationError as e:
        return [
            f"step {step.name!r}: config.{'.'.join(map(str, err['loc']))}: {err['msg']}"
            for err in e.errors()
        ]
    return []


def _train_cfg(step: StepSpec) -> TrainConfig:
    return TrainConfig.build({"progress": False, "cpu": True, "seed": step.seed, **step.train})


def _check_train(step: StepSpec) -> list[str]:
    try:
        _train_cfg(step)
    except ConfigError as e:
        return [f"step {step.name!r}: train: {e}"]
    return []


def _check_student(step: StepSpec) -> list[str]:
    if not step.student:
        return [f"step {step.name!r}: needs `student` (an architecture, e.g. {{arch: tiny_cnn}})"]
    try:
        build_classifier(step.student)
    except LfmError as e:
        return [f"step {step.name!r}: student: {e}"]
    return []


# ------------------------------------------------------------------------------------------
# Classifiers: train, statistics, accuracy.


def _ce(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _train_classifier(ctx: Context) -> str:
    step = ctx.step
    spec = D.parse("images", step.data)
    if "base" in ctx.inputs:
        model, arch = load_classifier(ctx.one("base").path)
    else:
        arch = dict(step.student or {})
        torch.manual_seed(step.seed)
        model = build_classifier(arch)
    x, y = D.images(spec, "train")
    model.train()
    hist = train(model, _ce, D.batches(x, y, spec.batch_size, step.seed), _train_cfg(step))
    xt, yt = D.images(spec, "test")
    ctx.metrics.update(loss=hist.losses[-1], accuracy=accuracy(model, xt, yt))
    save_classifier(ctx.out / "classifier", model, arch)
    return "classifier"


_step(Kind(
    "train_classifier", {}, "classifier", _train_classifier, optional={"base": ("classifier",)},
    data="images", check=lambda s: _check_train(s) + ([] if s.base else _check_student(s)),
    extra=("student", "train"),
))  # fmt: skip


class StatsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = Field("gram", pattern="^(gram|fisher)$")  # RegMean's Gram matrices or Fisher's


def _statistics(ctx: Context) -> str:
    from lfm.reuse.stats import save_fisher, save_gram

    cfg = StatsConfig.model_validate(ctx.step.config)
    spec = D.parse("images", ctx.step.data)
    model, _ = load_classifier(ctx.one("model").path)
    x, y = D.images(spec, "train")
    save = save_gram if cfg.kind == "gram" else save_fisher
    save(ctx.out / "stats.safetensors", model, D.batches(x, y, spec.batch_size, ctx.step.seed))
    return "stats.safetensors"


_step(Kind(
    "statistics", {"model": ("classifier",)}, "stats", _statistics, data="images",
    check=lambda s: _config(StatsConfig, s), extra=("config",),
))  # fmt: skip


def _evaluate_accuracy(ctx: Context) -> str:
    """Test accuracy of each model (`model`, or every one of `models`), keyed by its name."""
    spec = D.parse("images", ctx.step.data)
    x, y = D.images(spec, "test")
    key = "models" if "models" in ctx.inputs else "model"
    names = ctx.step.models if key == "models" else [ctx.step.model]
    for name, art in zip(names or [], ctx.inputs[key], strict=True):
        model, _ = load_classifier(art.path)
        ctx.metrics[str(name)] = accuracy(model, x, y)
    return ""


_step(Kind(
    "evaluate_accuracy", {}, "metrics", _evaluate_accuracy, data="images",
    optional={"model": ("classifier",), "models": ("classifier",)},
    check=lambda s: [] if (s.model or s.models) else [f"step {s.name!r}: give `model` or `models`"],
))  # fmt: skip


# ------------------------------------------------------------------------------------------
# Registered methods as steps, by area shape.


def _reuse_kernel(spec: registry.MethodSpec) -> Kind:
    def execute(ctx: Context) -> str:
        cfg = dict(ctx.step.config)
        if "stats" in ctx.inputs:
            cfg["stats"] = [a.path for a in ctx.inputs["stats"]]
        models = [classifier_handle(a) for a in ctx.inputs["models"]]
        base = classifier_handle(ctx.one("base")) if "base" in ctx.inputs else None
        merged = registry.run(spec.key, models, base=base, cfg=cfg)
        module, arch = load_classifier(ctx.inputs["models"][0].path)
        module.load_state_dict(merged)
        save_classifier(ctx.out / "classifier", module, arch)
        return "classifier"

    needs = {"models": ("classifier",)}
    optional = {"stats": ("stats",), "base": ("classifier",)}
    if spec.extras.get("needs_base", True):
        needs["base"] = ("classifier",)
    return Kind(spec.key, needs, "classifier", execute, optional=optional,
                check=lambda s: _method_config(spec, s, drop=("stats",)), extra=("config",))  # fmt: skip


def _distill_loss(spec: registry.MethodSpec) -> Kind:
    def execute(ctx: Context) -> str:
        data = D.parse("images", ctx.step.data)
        teacher = narrow(classifier_handle(ctx.one("teacher")), spec.access)  # exactly its level
        torch.manual_seed(ctx.step.seed)
        student = build_classifier(dict(ctx.step.student or {}))
        x, y = D.images(data, "train")
        batches = [(xb,) for xb, _ in D.batches(x, y, data.batch_size, ctx.step.seed)]
        student.train()
        registry.run(spec.key, teacher, student, batches, cfg=ctx.step.config,
                     train_cfg=_train_cfg(ctx.step))  # fmt: skip
        xt, yt = D.images(data, "test")
        ctx.metrics["accuracy"] = accuracy(student, xt, yt)
        save_classifier(ctx.out / "classifier", student, dict(ctx.step.student or {}))
        return "classifier"

    return Kind(spec.key, {"teacher": ("classifier",)}, "classifier", execute, data="images",
                access=spec.access, extra=("student", "config", "train"),
                check=lambda s: _method_config(spec, s) + _check_student(s) + _check_train(s))  # fmt: skip


def _reuse_ensemble(spec: registry.MethodSpec) -> Kind:
    """An ensemble is no model on disk: the step scores the combined answers on the test split."""

    def execute(ctx: Context) -> str:
        data = D.parse("images", ctx.step.data)
        x, y = D.images(data, "test")
        members = [narrow(classifier_handle(a), spec.access) for a in ctx.inputs["models"]]
        out = registry.run(spec.key, members, x, cfg=ctx.step.config)
        pred = out.argmax(-1) if out.ndim == 2 else out  # log-probabilities, or voted labels
        ctx.metrics["accuracy"] = (pred == y).float().mean().item()
        return ""

    return Kind(spec.key, {"models": ("classifier",)}, "metrics", execute, data="images",
                access=spec.access, extra=("config",), check=lambda s: _method_config(spec, s))  # fmt: skip


def _method_config(
    spec: registry.MethodSpec, step: StepSpec, drop: tuple[str, ...] = ()
) -> list[str]:
    try:
        spec.config.build({k: v for k, v in step.config.items() if k not in drop})
    except ConfigError as e:
        return [f"step {step.name!r}: config: {e}"]
    return []


# Adapters from an area shape to a step kind; a method whose shape is missing here cannot be a
# pipeline step yet (validation says so).
SHAPES: dict[tuple[str, str], Callable[[registry.MethodSpec], Kind]] = {
    ("reuse", "kernel"): _reuse_kernel,
    ("reuse", "ensemble"): _reuse_ensemble,
    ("distill", "loss"): _distill_loss,
}


def kind_of(run: str) -> Kind:
    """The kind of a step's `run`: a pipeline step, or a registered method of a supported shape."""
    if run in STEPS:
        return STEPS[run]
    if "/" not in run:
        hint = did_you_mean(run, STEPS)
        raise LfmError(
            f"no pipeline step {run!r} (steps: {', '.join(STEPS)}; or area/method){hint}"
        )
    spec = registry.get(run)
    make = SHAPES.get((spec.area, spec.shape.name))
    if make is None:
        raise LfmError(f"{spec.key} ({spec.area} {spec.shape.name}) cannot be a pipeline step yet")
    return make(spec)


# ------------------------------------------------------------------------------------------
# Language models: tune, merge an adapter, edit, apply a patch, evaluate.

BASE_FILE = "pipeline_base.json"  # in a tuned artifact: the model it was tuned from


def load_lm(art: Artifact, api_key: str | None = None) -> Any:
    """A handle on an `lm` artifact (an asset or a folder) or a served `url`."""
    if art.kind == "url":
        from lfm.serve import RemoteModel

        return RemoteModel(art.path, api_key=api_key, access=art.access)
    from lfm.assets import load_model

    return load_model(art.path)


def _verbalizer(spec: D.TextClassData, classes: tuple[str, ...]) -> Any:
    from lfm.tuning.tasks import BBC_LABEL_WORDS, Verbalizer, bbc_verbalizer

    if spec.dataset == "bbc-news" and spec.file is None and set(classes) <= set(BBC_LABEL_WORDS):
        return bbc_verbalizer(classes, spec.max_chars)
    return Verbalizer("Text: {text}\nLabel:", tuple(classes), spec.max_chars)


def _classification(step: StepSpec) -> tuple[Any, Any]:
    from lfm.tuning.tasks import TextClassification

    spec = D.parse("classification", step.data)
    x, y, xe, ye, classes = D.text_classes(spec)
    verb = _verbalizer(spec, classes)
    return TextClassification(x, y, verb), TextClassification(xe, ye, verb)


def _tuner(spec: registry.MethodSpec) -> Kind:
    def execute(ctx: Context) -> str:
        handle = load_lm(ctx.one("model"))
        train_data, eval_data = _classification(ctx.step)
        result = registry.run(spec.key, handle, train_data, cfg=ctx.step.config,
                              train_cfg=_train_cfg(ctx.step), eval_data=eval_data,
                              seed=ctx.step.seed)  # fmt: skip
        result.save(ctx.out / "tuned")
        from lfm.core.io import write_json

        write_json(ctx.out / "tuned" / BASE_FILE, {"model": ctx.one("model").path})
        ctx.metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, int | float)})
        return "tuned"

    return Kind(spec.key, {"model": ("lm",)}, "tuned", execute, data="classification",
                extra=("config", "train"), check=lambda s: _method_config(spec, s) + _check_train(s))  # fmt: skip


def _merge_adapter(ctx: Context) -> str:
    """The base model with the tuned adapter merged into its weights, as a Hugging Face folder."""
    import json

    folder = Path(ctx.one("model").path)
    out = ctx.out / "model"
    if (folder / "model").is_dir():  # full weights were tuned: they are the model
        import shutil

        shutil.copytree(folder / "model", out)
        return "model"
    base = json.loads((folder / BASE_FILE).read_text())["model"]
    handle = load_lm(Artifact("lm", base))
    from peft import PeftModel

    merged = PeftModel.from_pretrained(handle.model, str(folder / "adapter")).merge_and_unload()
    _save_lm(merged, handle.tokenizer, out)
    return "model"


def _save_lm(model: Any, tokenizer: Any, out: Path) -> None:
    """Save a causal LM and its tokenizer as a Hugging Face folder (`lfm.assets.load_model` reads
    models from fp32 folders, so a merged one saves as it is)."""
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


_step(Kind("merge_adapter", {"model": ("tuned",)}, "lm", _merge_adapter))


def _requests(step: StepSpec) -> list[Any]:
    from lfm.edit.requests import Request

    if step.requests:
        return [Request(r["prompt"], r["subject"], r["target"]) for r in step.requests]
    return [f.request for f in D.facts(D.parse("facts", step.data))]


def _check_requests(step: StepSpec) -> list[str]:
    if bool(step.requests) == bool(step.data):
        return [
            f"step {step.name!r}: give `requests` or `data: {{ids: [...]}}` (facts), one of them"
        ]
    bad = [r for r in step.requests or [] if set(r) != {"prompt", "subject", "target"}]
    if bad:
        return [f"step {step.name!r}: a request has exactly prompt, subject and target"]
    return []


def _editor(spec: registry.MethodSpec) -> Kind:
    def execute(ctx: Context) -> str:
        handle = load_lm(ctx.one("model"))
        patch = registry.run(spec.key, handle, _requests(ctx.step), cfg=ctx.step.config)
        name = "patch.safetensors" if spec.access >= Access.WEIGHTS else "patch.json"
        patch.save(ctx.out / name)
        ctx.metrics["edits"] = len(patch.requests)
        return name

    return Kind(spec.key, {"model": ("lm", "url")}, "patch", execute, access=spec.access,
                data="facts", data_required=False, extra=("config", "requests"),
                check=lambda s: _method_config(spec, s) + _check_requests(s))  # fmt: skip


class ApplyPatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: bool = False  # never load the model: tensor by tensor (`patch-apply --stream`)


def _apply_patch(ctx: Context) -> str:
    from lfm.edit.recipes import patch_apply

    cfg = ApplyPatchConfig.model_validate(ctx.step.config)
    patch_apply(ctx.one("model").path, ctx.one("patch").path, ctx.out / "model", stream=cfg.stream)
    return "model"


_step(Kind("apply_patch", {"model": ("lm",), "patch": ("patch",)}, "lm", _apply_patch,
           check=lambda s: _config(ApplyPatchConfig, s), extra=("config",)))  # fmt: skip


def _evaluate_classification(ctx: Context) -> str:
    """Accuracy of label-word classification on the held-out examples (SCORES is enough)."""
    from lfm.tuning.tasks import accuracy as acc
    from lfm.tuning.tasks import class_scores

    handle = load_lm(ctx.one("model"))
    _, ev = _classification(ctx.step)
    ctx.metrics["accuracy"] = acc(class_scores(handle, list(ev.texts), ev.verbalizer), ev.labels)
    return ""


_step(Kind("evaluate_classification", {"model": ("lm", "url")}, "metrics",
           _evaluate_classification, data="classification", access=Access.SCORES))  # fmt: skip


def _evaluate_edits(ctx: Context) -> str:
    """CounterFact metrics of the facts (efficacy, paraphrase, neighbourhood, score), percent."""
    from lfm.edit.facts import evaluate_fact, summarise

    handle = load_lm(ctx.one("model"))
    facts = D.facts(D.parse("facts", ctx.step.data))
    subjects = [f.subject for f in facts]
    rows = [evaluate_fact(handle, f, edited=subjects) for f in facts]
    ctx.metrics.update(summarise(rows))
    return ""


_step(Kind("evaluate_edits", {"model": ("lm",)}, "metrics", _evaluate_edits, data="facts"))


def _evaluate_perplexity(ctx: Context) -> str:
    from lfm.distill.lm import perplexity, token_blocks

    handle = load_lm(ctx.one("model"))
    blocks = token_blocks(handle.tokenizer, D.texts(D.parse("text", ctx.step.data)), 64)
    ctx.metrics["perplexity"] = perplexity(handle.model, blocks)
    return ""


_step(Kind("evaluate_perplexity", {"model": ("lm",)}, "metrics", _evaluate_perplexity, data="text"))

SHAPES[("tuning", "tuner")] = _tuner
SHAPES[("edit", "editor")] = _editor


# ------------------------------------------------------------------------------------------
# Meta learning: meta-train a learner on a family of few-shot tasks, score it on held-out ones.

LEARNER_FILE = "learner.json"  # beside `model.safetensors` (lfm.meta's format): what it is


def _meta_learner(spec: registry.MethodSpec) -> Kind:
    from lfm.meta.recipes import DATAFREE

    if spec.name in DATAFREE:
        raise LfmError(f"{spec.key} learns from a pool of models, not from tasks: not a step yet")

    def config(step: StepSpec, task: str) -> Any:
        from lfm.meta.recipes import task_preset

        return spec.config.build({**task_preset(spec, task), **step.config})

    def execute(ctx: Context) -> str:
        from lfm.core.io import write_json
        from lfm.meta.recipes import build_problem, save_result

        data = D.parse("episodes", ctx.step.data)
        cfg = config(ctx.step, data.task)
        adapts = "inner_lr" in spec.config.model_fields  # else a 64-wide embedding (ProtoNets)
        model, tasks, _ = build_problem(data.task, data.shots, data.ways, adapts, ctx.step.seed)
        result = registry.run(spec.key, model, tasks, cfg=cfg, seed=ctx.step.seed)
        folder = ctx.out / "learner"
        folder.mkdir(parents=True)
        save_result(folder / "model.safetensors", result)
        write_json(folder / LEARNER_FILE, {"method": spec.key, "config": cfg.to_dict(),
                                           "adapts": adapts, "seed": ctx.step.seed,
                                           **data.model_dump()})  # fmt: skip
        if result.history.loss:
            ctx.metrics["final_meta_loss"] = result.history.loss[-1]
        return "learner"

    def check(step: StepSpec) -> list[str]:
        try:
            config(step, D.parse("episodes", step.data).task)
        except LfmError as e:
            return [f"step {step.name!r}: config: {e}"]
        return []

    return Kind(spec.key, {}, "learner", execute, data="episodes", data_required=False,
                extra=("config",), check=check)  # fmt: skip


def _evaluate_fewshot(ctx: Context) -> str:
    """Each learner adapted to held-out tasks of its own family (classes it never saw, drawn with
    its seed) the way its method adapts; the mean score (accuracy, or MSE on sine waves)."""
    import json

    from lfm.meta.recipes import build_problem, load_result
    from lfm.meta.train import meta_test

    key = "models" if "models" in ctx.inputs else "model"
    names = ctx.step.models if key == "models" else [ctx.step.model]
    for name, art in zip(names or [], ctx.inputs[key], strict=True):
        info = json.loads((Path(art.path) / LEARNER_FILE).read_text())
        data = D.parse("episodes", {**{k: info[k] for k in ("task", "shots", "ways")},
                                    **(ctx.step.data or {})})  # fmt: skip
        if (data.task, data.shots, data.ways) != (info["task"], info["shots"], info["ways"]):
            raise LfmError(f"step {ctx.step.name!r}: {name} was meta-trained on {info['task']} "
                           f"{info['ways']}-way {info['shots']}-shot; evaluate it on those")  # fmt: skip
        model, _, test = build_problem(data.task, data.shots, data.ways, info["adapts"],
                                       info["seed"])  # fmt: skip
        state, lrs, _ = load_result(Path(art.path) / "model.safetensors")
        model.load_state_dict(state)
        spec = registry.get(info["method"])
        score = meta_test(model, test, info["method"], spec.config.build(info["config"]),
                          n_tasks=data.test_tasks, inner_lrs=lrs)  # fmt: skip
        ctx.metrics[str(name)] = score["mean"]
        ctx.metrics[f"{name} ±95%"] = score["ci95"]
    return ""


_step(Kind(
    "evaluate_fewshot", {}, "metrics", _evaluate_fewshot, data="episodes", data_required=False,
    optional={"model": ("learner",), "models": ("learner",)},
    check=lambda s: [] if (s.model or s.models) else [f"step {s.name!r}: give `model` or `models`"],
))  # fmt: skip
SHAPES[("meta", "learner")] = _meta_learner
