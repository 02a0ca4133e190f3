"""Shared parts of the data-free methods: the generator, the alternating game, the examples.

The generator follows DAFL (Chen et al. 2019, arXiv 1904.01186) and DFAD (arXiv 1912.11006);
`play` alternates one generator update with n_S student updates, the schedule of DAFL, DFAD and
DFME (arXiv 2011.14779). The shared training loop `lfm.core.train.train` drives one optimizer
over one loss, so these two-player games keep their own small loop here, and their own
checkpoints (`Game`: both models, both optimizers, the latent generator, the losses so far and
the game's counters, through `lfm.core.checkpoints`), from which a resumed game goes on to the
result of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import trange

from lfm.access import Access, LocalClassifier, narrow
from lfm.config import Config
from lfm.core import placement
from lfm.core.checkpoints import Checkpoints, prefixed
from lfm.core.tiny import tiny_cnn
from lfm.distill.contract import InputSpec
from lfm.errors import LfmError
from lfm.registry import Example


class Generator(nn.Module):
    """z (B, nz) → images (B, C, size, size) in [0, 1]: the DAFL / DFAD generator shape.

    A linear layer to a (2w, size/4, size/4) map, two ×2 upsamplings each followed by a 3×3
    convolution, BatchNorm and LeakyReLU, then a 3×3 convolution to C channels and a sigmoid
    (the teachers here take pixels in [0, 1]; the papers end with tanh for normalised inputs).
    """

    def __init__(self, nz: int = 100, channels: int = 1, size: int = 28, width: int = 64):
        super().__init__()
        self.nz, self.start = nz, size // 4
        self.fc = nn.Linear(nz, 2 * width * self.start**2)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), -1, self.start, self.start)  # (B, 2w, s/4, s/4)
        return self.net(x)


def game_generator(
    data: InputSpec | None, generator: nn.Module | None, nz: int, width: int, what: str
) -> nn.Module:
    """The generator given, else a `Generator` of width `width` for images of `data.shape`."""
    if generator is not None:
        return generator
    if not isinstance(data, InputSpec):
        raise LfmError(f"{what} needs data=InputSpec(shape, n_classes) or a generator")
    shape = tuple(data.shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 4:
        raise LfmError(
            f"{what}: the default generator makes square (C, S, S) images with S a multiple of 4, "
            f"not {shape}; pass a generator"
        )
    return Generator(nz, channels=shape[0], size=shape[1], width=width)


@dataclass
class Game:
    """What the remaining updates of a data-free game depend on: saved into `ckpt`'s run every
    `ckpt.every` generator updates (and after the last), restored from it on resume.

    `counters` are the game's running counts (DFME's queries spent), kept in it by the game.
    Torch's global generator is saved too: a generator or student with dropout draws from it.
    """

    generator: nn.Module
    student: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    rng: torch.Generator  # the latent draws (and DFME's directions)
    ckpt: Checkpoints | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**prefixed("generator", self.generator), **prefixed("student", self.student)}

    def resume(self, history: list[dict[str, float]]) -> int:
        """Restore the last checkpoint in place; the generator updates done (0: none)."""
        state = self.ckpt.read(self.tensors(), self.optimizers) if self.ckpt else None
        if state is None:
            return 0
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history[:] = state["history"]
        self.counters.update(state["counters"])
        return int(state["step"])

    def after(self, step: int, last: int, history: list[dict[str, float]]) -> None:
        """Checkpoint after generator update `step` of `last` when one is due."""
        if self.ckpt is not None and self.ckpt.due(step, last):
            self.ckpt.write(step, self.tensors(), self.optimizers, history=history,
                            rng=self.rng.get_state(), torch_rng=torch.get_rng_state(),
                            counters=dict(self.counters))  # fmt: skip


def place(student: nn.Module, *modules: nn.Module) -> torch.device:
    """Move the student and `modules` (the generator, a white-box teacher) in place to where the
    game runs, and return it: the chosen `--device`, else where the student is."""
    device = placement.loop_device(student)
    for m in (student, *modules):
        m.to(device)
    return device


def play(
    iterations: int,
    student_steps: int,
    generator_step: Callable[[], dict[str, float]],
    student_step: Callable[[], dict[str, float]],
    progress: bool = False,
    desc: str = "",
    game: Game | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]]:
    """Alternate one generator update with `student_steps` student updates; log the last ones
    (`progress`: a bar over the generator updates, named `desc`). Each update runs under the
    chosen autocast (`--dtype`) on the game's device; the weights and optimisers stay float32.

    With `game`, checkpoint at its interval and go on from a checkpoint its run holds; `stop()`
    ends the game early when true before an update (a query budget spent).
    """
    history: list[dict[str, float]] = []
    start = game.resume(history) if game is not None else 0
    device = placement.device_of(game.generator) if game is not None else torch.device("cpu")
    for it in trange(start, iterations, initial=start, total=iterations, desc=desc,
                     disable=not progress, dynamic_ncols=True, leave=False):  # fmt: skip
        if stop is not None and stop():
            break
        with placement.autocast(device):
            logged = generator_step()
            for _ in range(student_steps):
                s_logged = student_step()
        history.append({**logged, **s_logged})
        if game is not None:
            game.after(it + 1, iterations, history)
    return history


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sample(gen: nn.Module, n: int, g: torch.Generator) -> torch.Tensor:
    """n images from the generator in train mode (BatchNorm on batch statistics, as the papers).

    The running statistics lag a generator that changes every step, so eval mode would hand the
    student other images than those the generator was optimised for.
    """
    z = torch.randn(n, gen.nz, generator=g)  # drawn on the CPU: the same draws on any device
    return gen.train()(z.to(placement.device_of(gen)))


def history_tensor(result: Any) -> torch.Tensor:
    """A game's logged values, one row per generator update (the examples' summary)."""
    return torch.tensor([list(h.values()) for h in result.history])


def game_example(cfg: Config) -> Callable[[Access, int], Example]:
    """A registry example for a data-free game: two rounds on 1×8×8 images against a tiny
    BatchNorm CNN teacher (its handle at the level asked for)."""

    def example(level: Access, seed: int) -> Example:
        teacher = narrow(LocalClassifier(tiny_cnn(seed), "teacher"), level)
        student = tiny_cnn(seed + 1, warm=False, width=4)
        args = (teacher, student, InputSpec((1, 8, 8), 10))
        return Example(args, {"seed": seed}, cfg, summary=history_tensor)

    return example
