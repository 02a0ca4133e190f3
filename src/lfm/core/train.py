"""A small shared training loop on Hugging Face Accelerate.

    history = train(model, loss_fn, batches, TrainConfig(steps=500, lr=1e-3), run=Run("kd"))

The same code runs on a CPU, one GPU or many (`accelerate launch script.py`): AdamW, gradient
accumulation (the loss of each micro-batch is divided by the number of micro-batches, so that
accumulating `a` batches of size `b` equals one batch of size `a·b` for mean losses), gradient
clipping, an evaluation callback every N steps and checkpoints every N steps into a run directory.
`lr_groups` gives some parameters their own learning rate: each trainable parameter goes to the
first pattern that `re.search`es its name (one AdamW parameter group per pattern), the rest train
at `lr`; a pattern that matches no trainable parameter is an error, not a silent no-op.

A checkpoint holds what training changes: the trainable parameters and the buffers (safetensors;
the frozen parameters, such as the base model under a LoRA adapter, are the model's own and are not
copied), the optimizer state, the step, the loss history and the RNG states (torch, CUDA, Python,
NumPy), all as plain tensors and numbers loaded with `weights_only=True`. Passing a run whose
directory holds a checkpoint resumes from it: the frozen parameters come with the model passed in,
and the batch stream is fast-forwarded past the micro-batches already used, so for batches that do
not depend on the global RNG (a list, or `shuffled_batches`) a resumed run ends with the same
weights as an uninterrupted one. A checkpoint is written atomically (`Run.output`); one a killed
process left half-written is removed when its run directory is resumed (`lfm.core.tmp`).

Under several processes (`accelerate launch --multi_gpu --num_processes N script.py`; on a
machine without GPUs, or with `cpu=True`, that is N CPU processes over gloo, whereas Accelerate's
`--cpu --num_processes N` starts a single process), micro-batch i goes to process `i mod N` and DDP
averages the gradients, so N processes with micro-batches of b and `grad_accum` a take the same
steps as one process with batches of N·a·b (for mean losses over equal-sized micro-batches). The
logged loss is the mean over all processes. Only the main process writes: the run directory
(`run_on_main` creates it there and nowhere else), metrics and checkpoints; the others resume from
the main process's run directory.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, reduce, set_seed
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lfm.config import Config
from lfm.core import placement
from lfm.core.runs import Run
from lfm.errors import ConfigError

LossFn = Callable[[nn.Module, Any], "torch.Tensor | dict[str, torch.Tensor]"]
CHECKPOINT = "checkpoint"


class TrainConfig(Config):
    steps: int = Field(100, ge=1)  # optimizer steps in all (a resumed run counts the earlier ones)
    lr: float = Field(1e-3, gt=0)  # AdamW learning rate
    lr_groups: dict[str, float] = Field(default_factory=dict)  # name regex -> lr; first match wins
    weight_decay: float = Field(0.01, ge=0)  # AdamW decoupled weight decay (torch's default)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    max_grad_norm: float = Field(0.0, ge=0)  # clip the gradient norm to this; 0 turns it off
    eval_every: int = Field(
        0, ge=0
    )  # run the evaluation callback every N steps; 0: at the end only
    ckpt_every: int = Field(0, ge=0)  # checkpoint into the run directory every N steps; 0: never
    log_every: int = Field(10, ge=1)  # write the latest metrics to the run manifest every N steps
    seed: int = 0  # seeds torch, NumPy and Python before the first step
    progress: bool = True  # show a progress bar on the main process
    cpu: bool = False  # stay on the CPU even when an accelerator is present
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision (Accelerate)

    @field_validator("lr_groups")
    @classmethod
    def _check_groups(cls, groups: dict[str, float]) -> dict[str, float]:
        for pattern, lr in groups.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
            if not lr > 0:
                raise ValueError(f"the learning rate of {pattern!r} must be > 0, not {lr}")
        return groups


@dataclass
class History:
    """What a training run returns: the loss per step and the evaluations."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    start_step: int = 0  # the step a resumed run started from


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal LM loss: mean NLL of token t+1 given tokens ≤ t; logits (B, T, V), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def shuffled_batches(*tensors: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[tuple]:
    """Endless mini-batches of `tensors` (split on dim 0), reshuffled each epoch by its own seed."""
    n = len(tensors[0])
    for epoch in itertools.count():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield tuple(t[idx] for t in tensors)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the trainable parameters at `cfg.lr`, then one group per pattern.

    Raises:
        ConfigError: a pattern of `cfg.lr_groups` matches no trainable parameter.
    """
    patterns = list(cfg.lr_groups)
    found: dict[str | None, list[nn.Parameter]] = {None: [], **{p: [] for p in patterns}}
    for name, p in model.named_parameters():
        if p.requires_grad:
            found[next((pt for pt in patterns if re.search(pt, name)), None)].append(p)
    unused = [pt for pt in patterns if not found[pt]]
    if unused:
        raise ConfigError(
            f"lr_groups {', '.join(map(repr, unused))} match no trainable parameter of "
            f"{type(model).__name__}; trainable names look like {_example_names(model)}"
        )
    groups = [{"params": found[None], "lr": cfg.lr}] if found[None] else []
    return groups + [{"params": found[pt], "lr": cfg.lr_groups[pt]} for pt in patterns]


def _example_names(model: nn.Module, n: int = 3) -> str:
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return ", ".join(names[:n]) or "(none: nothing trains)"


def _stream(batches: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    """Cycle `batches` forever, keeping the micro-batches of this process."""
    index = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            if index % world == rank:
                yield batch
            index += 1
        if empty:
            raise ValueError(
                "batches ran out: pass a re-iterable (list, DataLoader) or an endless one"
            )


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _split(out: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise and the parts to log, from a tensor or a dict with a "loss" key."""
    if isinstance(out, torch.Tensor):
        return out, {}
    return out["loss"], {k: float(v) for k, v in out.items() if k != "loss"}


def _step(model, opt, loss_fn: LossFn, stream, acc: Accelerator, cfg: TrainConfig) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss and parts."""
    model.train()
    logged: dict[str, float] = {}
    for i in range(cfg.grad_accum):
        sync = i == cfg.grad_accum - 1
        with nullcontext() if sync else acc.no_sync(model):
            loss, parts = _split(loss_fn(model, _to(next(stream), acc.device)))
            acc.backward(loss / cfg.grad_accum)
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            logged[k] = logged.get(k, 0.0) + v / cfg.grad_accum
    if cfg.max_grad_norm:
        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return _mean_across(acc, logged)


def _mean_across(acc: Accelerator, logged: dict[str, float]) -> dict[str, float]:
    """The logged values averaged over the processes (one all-reduce; none on one process)."""
    if acc.num_processes == 1:
        return logged
    mean = reduce(torch.tensor(list(logged.values()), device=acc.device, dtype=torch.float64))
    return dict(zip(logged, mean.tolist(), strict=True))


def _use_cpu(cpu: bool) -> bool:
    """Accelerate sees several processes on a machine without an accelerator (torchrun's
    WORLD_SIZE > 1) as multi-CPU only when told `cpu=True`; otherwise each trains alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return cpu or (world > 1 and not torch.accelerator.is_available())


def run_on_main(*args: Any, cpu: bool = False, **kwargs: Any) -> Run | None:
    """`Run(*args, **kwargs)` on the main process, None on the others (one run directory).

    Args:
        cpu: the `TrainConfig.cpu` of the training to come (it fixes the process layout).
    """
    return (
        Run(*args, **kwargs)
        if PartialState(cpu=_use_cpu(_wants_cpu(cpu))).is_main_process
        else None
    )


def _run_path(acc: Accelerator, run: Run | None) -> Path | None:
    """The main process's run directory, on every process (None: no run)."""
    path = [str(run.path) if run is not None else None]
    if acc.num_processes > 1:
        broadcast_object_list(path)
    return None if path[0] is None else Path(path[0])


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(
    run: Run | None, acc: Accelerator, model, opt, step: int, hist: History
) -> None:
    """Write weights, optimizer, step, losses and RNG into `run/checkpoint`, atomically.

    Every process calls it (it waits for all of them); only the main process, whose `run` is
    not None, writes.
    """
    acc.wait_for_everyone()
    if acc.is_main_process and run is not None:
        with run.output(CHECKPOINT) as tmp:
            tmp.mkdir()
            save_file(changing_tensors(acc.unwrap_model(model)), str(tmp / "model.safetensors"))
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            meta = {"step": step, "losses": hist.losses, "rng": _rng_state()}
            torch.save(meta, tmp / "state.pt")
    acc.wait_for_everyone()


def changing_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and the buffers of `model`, by state-dict name: what a checkpoint
    must keep. A tensor under two names (tied embeddings) is kept once."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in params and not params[name].requires_grad:
            continue  # frozen: the model's own value, restored with the model
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach().contiguous()
    return out


def _load_weights(model: nn.Module, file: Path, device: str) -> None:
    """Load a checkpoint's tensors into `model` (an older checkpoint holds every weight)."""
    got = model.load_state_dict(load_file(str(file), device=device), strict=False)
    if got.unexpected_keys:
        raise ConfigError(
            f"{file} holds tensors this model lacks ({', '.join(got.unexpected_keys[:3])}); "
            "resume with the model it was trained from"
        )


def load_checkpoint(path: Path, acc: Accelerator, model, opt, hist: History) -> int:
    """Restore weights, optimizer, losses and RNG from a checkpoint folder; return its step."""
    _load_weights(acc.unwrap_model(model), path / "model.safetensors", str(acc.device))
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    meta = torch.load(path / "state.pt", weights_only=True)
    hist.losses[:] = [float(x) for x in meta["losses"]]
    hist.start_step = int(meta["step"])
    _set_rng_state(meta["rng"])
    return hist.start_step


@torch.no_grad()
def _evaluate(evaluate: Callable[[nn.Module], dict], acc: Accelerator, model, step: int) -> dict:
    model.eval()
    out = {k: float(v) for k, v in evaluate(acc.unwrap_model(model)).items()}
    return {"step": step, **out}


def _wants_cpu(cpu: bool) -> bool:
    """Training on the CPU: asked by the config, or by a chosen placement (`--device cpu`)."""
    at = placement.current()
    return cpu or (at.device_chosen and at.cpu)


def _accelerator(cfg: TrainConfig) -> Accelerator:
    """The loop's Accelerator: on the CPU when `cfg.cpu` or a chosen placement says so, with the
    autocast precision of `cfg.mixed_precision`, else of a chosen placement's dtype.

    Accelerate's state is one per process and refuses another precision or device once made; a
    process of one machine that trains in float32 and then in bfloat16, or on the GPU and then on
    the CPU (the Python API, a notebook), gets a fresh state. Distributed processes keep theirs:
    there all ranks must agree anyway."""
    at = placement.current()  # `--device` / `--dtype`, when a command was given them
    cpu = _use_cpu(_wants_cpu(cfg.cpu))
    mixed = cfg.mixed_precision if cfg.mixed_precision != "no" else at.mixed_precision
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        on_cpu = PartialState().device.type == "cpu"
        moved = cpu != on_cpu and (cpu or torch.accelerator.is_available())
        if moved or AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    cfg: TrainConfig = TrainConfig(),
    run: Run | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> History:
    """Train `model` in place with AdamW on `loss_fn(model, batch)`.

    Args:
        model: the module whose trainable parameters are optimised.
        loss_fn: returns the loss of one micro-batch, or a dict with "loss" and parts to log.
        batches: an iterable of micro-batches (tensors, tuples or dicts of tensors), cycled.
        cfg: steps, learning rates, accumulation, evaluation and checkpoint intervals.
        run: a run directory for metrics and checkpoints; one holding a checkpoint is resumed.
        evaluate: `evaluate(model) -> {name: value}`, called in eval mode without gradients.
    """
    acc = _accelerator(cfg)
    set_seed(cfg.seed)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    stream, hist = _stream(batches, acc.process_index, acc.num_processes), History()
    run = run if acc.is_main_process else None
    path = _run_path(acc, run)
    if path is not None and (path / CHECKPOINT).is_dir():
        for _ in range(load_checkpoint(path / CHECKPOINT, acc, model, opt, hist) * cfg.grad_accum):
            next(stream)
    bar = tqdm(
        range(hist.start_step, cfg.steps), initial=hist.start_step, total=cfg.steps,
        disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True,
        desc=run.manifest.get("name", "train") if run is not None else "train",
    )  # fmt: skip
    for step in bar:
        logged = _step(model, opt, loss_fn, stream, acc, cfg)
        hist.losses.append(logged["loss"])
        bar.set_postfix(loss=f"{logged['loss']:.4f}")
        _after_step(step + 1, logged, model, opt, acc, cfg, (run, path), evaluate, hist)
    return hist


def _after_step(step, logged, model, opt, acc, cfg, runs, evaluate, hist) -> None:
    """Evaluate, log and checkpoint at their intervals (evaluation also at the last step)."""
    last = step == cfg.steps
    evaluated = evaluate is not None and (
        last or bool(cfg.eval_every and step % cfg.eval_every == 0)
    )
    if evaluated:
        hist.evals.append(_evaluate(evaluate, acc, model, step))
        logged = {**logged, **hist.evals[-1]}
    run, path = runs  # `run` on the main process only; its `path` on every process
    if run is not None and (last or evaluated or step % cfg.log_every == 0):
        run.log(**{**logged, "step": step})
    if path is not None and cfg.ckpt_every and (step % cfg.ckpt_every == 0 or last):
        save_checkpoint(run, acc, model, opt, step, hist)
