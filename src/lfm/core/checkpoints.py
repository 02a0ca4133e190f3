"""A training loop's state in a run directory: written every few steps, read back on resume.

    ckpt = Checkpoints(run, every=100)
    state = ckpt.read(tensors, {"optimizer": opt})  # None: no checkpoint, start at step 0
    for step in range(state["step"] if state else 0, steps):
        ...
        if ckpt.due(step + 1, steps):
            ckpt.write(step + 1, tensors, {"optimizer": opt}, loss=losses, rng=gen.get_state())

`run/checkpoint/` holds `params.safetensors` (the tensors the loop changes, by name), one
`<name>.pt` per optimizer (its state dict) and `state.pt` (the step and whatever else the rest of
the loop depends on: numbers, strings, lists, dicts and tensors such as a `torch.Generator`'s
state). Every file is read with safetensors or `torch.load(..., weights_only=True)`: nothing is
unpickled. The folder is written atomically (`Run.output`) and replaces the previous one; a
half-written one that a killed process left is removed when its run directory is resumed
(`lfm.core.tmp`). The Accelerate loop of `lfm.core.train` keeps its own checkpoints (one model and
one optimizer, possibly over several processes); this is for the loops that drive several
models, optimizers or generators themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lfm.core.runs import Run
from lfm.errors import LfmError

CHECKPOINT = "checkpoint"  # the folder in a run directory holding a loop's state
TENSORS = "params.safetensors"
STATE = "state.pt"


@dataclass
class Checkpoints:
    """Save a loop's state into `run/checkpoint/` every `every` steps (and after the last),
    atomically; `read` restores it into a loop given a run that holds one.

    Args:
        run: the run directory.
        every: steps between checkpoints; 0: none.
    """

    run: Run
    every: int = 100

    @property
    def folder(self) -> Path:
        return self.run.path / CHECKPOINT

    def due(self, step: int, last: int) -> bool:
        """Whether to save after step `step` (counted from 1) of `last`."""
        return self.every > 0 and (step % self.every == 0 or step == last)

    def write(
        self,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        optimizers: Mapping[str, Any] | None = None,
        **state: Any,
    ) -> None:
        """Write the state after step `step`, replacing the previous checkpoint.

        Args:
            step: the steps done.
            tensors: the tensors the loop changes (weights, buffers, banks of inputs), by name.
            optimizers: each optimizer by name (its state dict goes to `<name>.pt`).
            state: the rest, as plain data and tensors (`torch.load(weights_only=True)` reads it).
        """
        with self.run.output(CHECKPOINT) as tmp:
            tmp.mkdir()
            save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(tmp / TENSORS))
            for name, opt in (optimizers or {}).items():
                torch.save(opt.state_dict(), tmp / f"{name}.pt")
            torch.save({"step": step, **state}, tmp / STATE)
        self.run.save()

    def read(
        self, tensors: Mapping[str, torch.Tensor], optimizers: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Restore a checkpoint in place: copy its tensors into `tensors` (same names) and load
        each optimizer's state. Returns its `state` with `step`, and under `tensors` the saved
        tensors that `tensors` does not name (None: no checkpoint).
        """
        if not (self.folder / STATE).is_file():
            return None
        saved = load_file(str(self.folder / TENSORS))
        wrong = [n for n, t in tensors.items() if n not in saved or saved[n].shape != t.shape]
        if wrong:
            raise LfmError(
                f"{self.folder} holds another model's state ({wrong[0]}); resume it with its options"
            )
        with torch.no_grad():
            for n, t in tensors.items():
                t.copy_(saved[n])
        for name, opt in (optimizers or {}).items():
            opt.load_state_dict(torch.load(self.folder / f"{name}.pt", weights_only=True))
        state = dict(torch.load(self.folder / STATE, weights_only=True))
        state["tensors"] = {n: t for n, t in saved.items() if n not in tensors}
        return state


def prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict (parameters and buffers, the tensors themselves) under `prefix/`."""
    return {f"{prefix}/{k}": v for k, v in module.state_dict(keep_vars=True).items()}
