"""What the `lfm meta` commands run, as Python functions.

    from lfm.meta import recipes
    done = recipes.train("maml", "sinusoid", shots=5, steps=2000)        # lfm meta train
    done = recipes.train("protonets", data="chars/", ways=5, shots=1)     # your own task folder
    done = recipes.datafree("datafree_blackbox", "digits", steps=100)    # lfm meta datafree

Each meta-trains (from tasks, or without data from a pool of classifiers it trains first),
meta-tests on held-out tasks the way the method adapts, and writes a run directory
`<root>/<stamp>-meta-<method>/` holding the manifest (resolved config, task, metrics, the SHA-256
of the config file and of the task folder given, the meta-loss curve under `history`),
`curves.png`, and `model.safetensors`: the meta-trained weights and, for Meta-SGD, the learned step
sizes as tensors `inner_lr/<parameter>` (format tag `lfm.meta.model/1`; read back with
`load_result`). Both checkpoint their loop into `checkpoint/` and continue a run directory given
as `resume` (see `lfm.meta.train.Checkpoints`); `datafree` also keeps its trained pool there
(`pool.safetensors`), so that a resumed run reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lfm.access import LocalClassifier, narrow
from lfm.config import Config
from lfm.core import placement
from lfm.core.io import load_tensors, save_tensors
from lfm.core.runs import read_manifest
from lfm.errors import LfmError
from lfm.meta.baseline import train_pool
from lfm.meta.contract import MetaResult, ModelPool
from lfm.meta.folders import QUERIES, folder_tasks
from lfm.meta.models import MLP, ConvNet
from lfm.meta.tasks import SinusoidTasks, rotated_digit_splits
from lfm.meta.train import Checkpoints, meta_test
from lfm.registry import MethodSpec, get, run
from lfm.runs import Run, on_disk

TASKS = ("sinusoid", "digits", "fashion-mnist")
FOLDER = "folder"  # the task name a run on your own task folder records
SIZES = {"digits": 8, "fashion-mnist": 28}  # image side of the rotated N-way tasks
DATAFREE = ("datafree_whitebox", "datafree_blackbox")
POOL_FILE = "pool.safetensors"  # a data-free run's trained pool models, read back on resume
FORMAT = "lfm.meta.model/1"  # the format tag of a saved meta-trained model
LR_PREFIX = "inner_lr/"  # tensor names of Meta-SGD's learned step sizes in that file


@dataclass
class Done:
    """What a recipe produced."""

    method: str  # the registered key, e.g. "meta/maml"
    score: dict[str, Any]  # meta-test: mean, ci95, n, metric
    path: Path  # the run directory
    result: MetaResult  # the meta-trained model and its history


def save_result(path: str | Path, result: MetaResult, **meta: Any) -> Path:
    """Write a meta-trained model (and Meta-SGD's step sizes) as one tagged safetensors file."""
    tensors = dict(result.model.state_dict())
    tensors.update({LR_PREFIX + n: t for n, t in (result.history.inner_lrs or {}).items()})
    return save_tensors(path, tensors, FORMAT, method=result.method, **meta)


def load_result(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The state dict, the learned step sizes (None if none) and the metadata of a saved model."""
    tensors, meta = load_tensors(path, FORMAT)
    lrs = {k.removeprefix(LR_PREFIX): v for k, v in tensors.items() if k.startswith(LR_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(LR_PREFIX)}
    return state, lrs or None, meta


def _spec(method: str, datafree: bool) -> MethodSpec:
    spec = get(method, area="meta")
    if (spec.name in DATAFREE) != datafree:
        other = "lfm meta train" if datafree else "lfm meta datafree"
        raise LfmError(f"{spec.key} is run by `{other} --method {spec.name}`")
    return spec


def _config(
    spec: MethodSpec, path: str | Path | None, preset: dict[str, Any], **fields: Any
) -> Config:
    """The method's config: `preset`, updated by a file (if given), then by `fields`."""
    base = spec.config.load(path).to_dict() if path else {}
    return spec.config.build({**preset, **base, **fields})


def _at_least_one(**counts: int) -> None:
    low = [k for k, v in counts.items() if v < 1]
    if low:
        raise LfmError(f"{', '.join(low)} must be at least 1")


def _task(task: str) -> str:
    if task not in TASKS:
        raise LfmError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return task


def build_problem(
    task: str, shots: int, ways: int, classifier: bool, seed: int
) -> tuple[nn.Module, Any, Any]:
    """(model, meta-train tasks, meta-test tasks) of a task family.

    `classifier`: the model outputs N ways (methods that adapt by gradient steps); else a
    64-wide embedding (ProtoNets). Images: 5 queries per class, 300 images per base class.
    """
    torch.manual_seed(seed)
    if _task(task) == "sinusoid":
        return MLP(1, 1, (40, 40)), SinusoidTasks(shots, 10), SinusoidTasks(shots, 100)
    train_tasks, _, test = rotated_digit_splits(
        task, seed=seed, per_class=300, ways=ways, shots=shots, queries=5
    )
    return ConvNet(ways if classifier else 64, 32, 4, SIZES[task]), train_tasks, test


def folder_problem(
    data: str | Path,
    shots: int,
    ways: int,
    classifier: bool,
    seed: int,
    size: int = 28,
    test_classes: float = 0.2,
) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """(model, meta-train tasks, meta-test tasks, what the manifest records) of a task folder.

    The model is the ConvNet of the bundled image tasks sized for `size` × `size` images of the
    folder's channels; `classifier` as in `build_problem`. 5 queries per class.
    """
    tasks = folder_tasks(
        data, ways=ways, shots=shots, size=size, test_classes=test_classes, seed=seed
    )
    torch.manual_seed(seed)
    model = ConvNet(ways if classifier else 64, 32, 4, size, channels=tasks.channels)
    info = {"name": FOLDER, "data": str(data), "shots": shots, "ways": ways, "queries": QUERIES,
            "seed": seed, "image_size": size, "channels": tasks.channels,
            "split": tasks.split}  # fmt: skip
    return model, tasks.train, tasks.test, info


def task_preset(spec: MethodSpec, task: str) -> dict[str, Any]:
    """Settings over the method's defaults for a task family: on images (a bundled image task or
    a task folder), a method that adapts by gradient steps starts from MAML's Omniglot α = 0.4
    and 3 test steps."""
    adapts = "inner_lr" in spec.config.model_fields
    images = task in SIZES or task == FOLDER
    return {"inner_lr": 0.4, "test_inner_steps": 3} if images and adapts else {}


def _check_resume(resume: str | Path, name: str, task: dict[str, Any]) -> None:
    """One-line errors when `resume` is not a run of this method on these tasks (`Run` itself
    checks the config, and that a task folder's files, wherever it now is, are unchanged)."""
    m = read_manifest(resume)
    if m.get("name") != name:
        raise LfmError(f"cannot resume {resume}: it is a {m.get('name')} run, not {name}")
    old = m.get("task") or {}
    differ = [k for k in sorted({*old, *task} - {"data"}) if old.get(k) != task.get(k)]
    if differ:
        raise LfmError(
            f"cannot resume {resume}: it ran with other task options ({', '.join(differ)}); "
            "give the options it ran with"
        )


def _finish(run_: Run, result: MetaResult, score: dict[str, Any], **metrics: Any) -> None:
    if result.history.loss:
        run_.history("meta_loss", result.history.loss, xlabel="meta-update")
    run_.log(
        final_meta_loss=result.history.loss[-1] if result.history.loss else None,
        **metrics,
        **{f"test_{k}": v for k, v in score.items()},
    )
    with run_.output("model.safetensors") as tmp:
        save_result(tmp, result)


def train(
    method: str = "maml",
    task: str | None = None,
    *,
    data: str | Path | None = None,
    image_size: int = 28,
    test_classes: float = 0.2,
    shots: int = 5,
    ways: int = 5,
    steps: int = 1000,
    meta_batch: int = 0,
    test_tasks: int = 600,
    config: str | Path | None = None,
    seed: int = 0,
    root: str | Path = "runs",
    resume: str | Path | None = None,
    ckpt_every: int = 100,
    progress: bool = False,
) -> Done:
    """Meta-train a learner from tasks, meta-test it on held-out tasks, write a run directory.

    Args:
        method: a meta method that learns from tasks (`maml`, `fomaml`, `anil`, `metasgd`,
            `reptile`, `protonets`, `pretrain`).
        task: `sinusoid` (MAML Sec. 5.1, the default), or `digits` / `fashion-mnist` (rotated
            N-way K-shot); on images the gradient-based methods start from MAML's Omniglot
            α = 0.4 and 3 test steps (a config file or the options override them).
        data: your own task folder instead of `task` (`lfm.meta.folders`): one folder of images
            per class, or `train/` and `test/` folders of class folders.
        image_size: `data` images are resized to this side.
        test_classes: `data` without `train/`/`test/`: the share of classes held out for
            meta-test, a fraction in (0, 1) or a count.
        shots: K support examples (per class on images).
        ways: N classes per episode (images).
        steps: meta-updates.
        meta_batch: tasks per meta-update; 0 keeps the method's default.
        test_tasks: held-out tasks at meta-test.
        config: a YAML/JSON config file of the method (the options above override it).
        seed: seeds the model, the class split and the task stream.
        root: where run directories are created.
        resume: a run directory of this method to continue from its checkpoint (same options).
        ckpt_every: checkpoint the outer loop every N meta-updates and after the last (0: never).
        progress: show progress bars (meta-training, meta-test).
    """
    spec = _spec(method, datafree=False)
    _at_least_one(shots=shots, ways=ways, test_tasks=test_tasks)
    if data is not None and task is not None:
        raise LfmError("give --task (a bundled task family) or --data (your own folder), not both")
    name = FOLDER if data is not None else _task(task or "sinusoid")
    adapts = "inner_lr" in spec.config.model_fields  # gradient steps on the support set
    batch = {"meta_batch": meta_batch} if meta_batch else {}
    cfg = _config(spec, config, task_preset(spec, name), steps=steps, **batch)
    if data is None:
        model, train_tasks, test = build_problem(name, shots, ways, adapts, seed)
        info: dict[str, Any] = {"name": name, "shots": shots, "ways": ways, "seed": seed}
    else:
        model, train_tasks, test, info = folder_problem(
            data, shots, ways, adapts, seed, image_size, test_classes
        )
    inputs = on_disk({"config": config, "data": data})
    if resume is not None:
        _check_resume(resume, f"meta-{spec.name}", info)
    with Run(f"meta-{spec.name}", cfg, inputs=inputs, root=root, path=resume) as run_:
        run_.manifest["task"] = info
        ckpt = Checkpoints(run_, ckpt_every)
        result = run(spec.key, model, train_tasks, cfg=cfg, seed=seed, progress=progress,
                     ckpt=ckpt)  # fmt: skip
        score = meta_test(result, test, cfg=cfg, n_tasks=test_tasks, progress=progress)
        _finish(run_, result, score)
    return Done(spec.key, score, run_.path, result)


def datafree(
    method: str = "datafree_whitebox",
    task: str = "digits",
    *,
    shots: int = 1,
    pool: int = 4,
    pool_steps: int = 150,
    steps: int = 100,
    test_tasks: int = 600,
    config: str | Path | None = None,
    seed: int = 0,
    root: str | Path = "runs",
    resume: str | Path | None = None,
    ckpt_every: int = 100,
    progress: bool = False,
) -> Done:
    """Train a pool of 5-way classifiers, meta-learn from them without their data, meta-test.

    The pool models (ConvNets of width 16 with BatchNorm running statistics) each learn their own
    5 of the meta-train classes; the learner gets them as WEIGHTS handles (`datafree_whitebox`)
    or narrowed to SCORES (`datafree_blackbox`), and a ProtoNet ConvNet of width 32 is
    meta-learned on pseudo episodes inverted from them, then tested on held-out classes.

    Args:
        method: `datafree_whitebox` or `datafree_blackbox`.
        task: `digits` or `fashion-mnist` (rotated 5-way).
        shots: K support examples per class at meta-test.
        pool: pool models.
        pool_steps: Adam steps per pool model.
        steps: data-free meta-updates.
        test_tasks: held-out episodes at meta-test.
        config: a YAML/JSON config file of the method (`steps` overrides it).
        seed: seeds the pool, the learner and the episodes.
        root: where run directories are created.
        resume: a run directory of this method to continue from its checkpoint (same options):
            the pool is read back from it, the meta-updates go on from the last checkpoint.
        ckpt_every: checkpoint the meta-updates every N and after the last (0: never); the
            trained pool is kept as `pool.safetensors` unless 0.
        progress: show progress bars (pool training, meta-updates, meta-test).
    """
    spec = _spec(method, datafree=True)
    _at_least_one(shots=shots, pool=pool, test_tasks=test_tasks)
    if task not in SIZES:
        raise LfmError(f"data-free meta-learning runs on {' or '.join(SIZES)}, not {task!r}")
    cfg, size = _config(spec, config, {}, steps=steps), SIZES[task]
    info = {"name": task, "shots": shots, "pool": pool, "pool_steps": pool_steps, "seed": seed}
    if resume is not None:
        _check_resume(resume, f"meta-{spec.name}", info)
    train_tasks, _, test = rotated_digit_splits(
        task, seed=seed, per_class=300, ways=5, shots=shots, queries=5
    )
    inputs = on_disk({"config": config})
    with Run(f"meta-{spec.name}", cfg, inputs=inputs, root=root, path=resume) as run_:
        run_.manifest["task"] = info
        make = lambda: ConvNet(5, 16, 4, size, running=True)  # noqa: E731
        models = _saved_pool(run_, make)  # a resumed run's pool: not trained again
        if models is None:
            models = train_pool(train_tasks, make, n_models=pool, ways=5, steps=pool_steps,
                                seed=seed, progress=progress)  # fmt: skip
            if ckpt_every:
                _save_pool(run_, models)
        models = [m.to(placement.loop_device(m)) for m in models]  # `--device`: the pool too
        level = spec.access.name.lower()  # the least the method needs: the handles give no more
        handles = [narrow(LocalClassifier(m), level) for m in models]
        torch.manual_seed(seed)
        source = ModelPool(handles, tuple(train_tasks.pools[0].shape[1:]))
        result = run(spec.key, ConvNet(64, 32, 4, size), source, cfg=cfg, seed=seed,
                     progress=progress, ckpt=Checkpoints(run_, ckpt_every))  # fmt: skip
        score = meta_test(result, test, cfg=cfg, n_tasks=test_tasks, progress=progress)
        _finish(run_, result, score, pool_queries=result.history.queries or None)
    return Done(spec.key, score, run_.path, result)


def _save_pool(run_: Run, models: list[nn.Module]) -> None:
    """Keep the trained pool models in the run directory (`<i>/<name>` tensors), atomically."""
    tensors = {f"{i}/{k}": v.contiguous() for i, m in enumerate(models)
               for k, v in m.state_dict().items()}  # fmt: skip
    with run_.output(POOL_FILE) as tmp:
        save_file(tensors, str(tmp))
    run_.save()


def _saved_pool(run_: Run, make: Any) -> list[nn.Module] | None:
    """The pool models a run directory holds, in eval mode as trained (None: it holds none)."""
    file = run_.path / POOL_FILE
    if not file.is_file():
        return None
    tensors = load_file(str(file))
    parts = [k.split("/", 1) for k in tensors]
    models = [make() for _ in range(len({i for i, _ in parts}))]
    for i, m in enumerate(models):
        try:
            m.load_state_dict({k: tensors[f"{j}/{k}"] for j, k in parts if j == str(i)})
        except RuntimeError:
            raise LfmError(f"{file} holds another pool; resume the run with its options") from None
    return [m.eval() for m in models]
