"""Shared parts of the data-free methods: the generator, the alternating game, smoke problems.

The generator follows DAFL (Chen et al. 2019, arXiv 1904.01186) and DFAD (arXiv 1912.11006);
`play` alternates one generator update with n_S student updates, the schedule of DAFL, DFAD and
DFME (arXiv 2011.14779). The shared training loop `lfm.core.train.train` drives one optimizer
over one loss, so these two-player games keep their own small loop here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lfm.access import Access, require
from lfm.config import Config


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


@contextmanager
def frozen(model: nn.Module, train: bool = False) -> Iterator[nn.Module]:
    """`model` with gradients off for its parameters, in eval mode unless `train`; restored on exit.

    A student stays in train mode while the generator ascends through it (as in the DFAD and DFME
    papers): its BatchNorm layers then see the same batch statistics as in its own updates.
    """
    flags, mode = [p.requires_grad for p in model.parameters()], model.training
    model.train(train).requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(mode)


def teacher_module(teacher: Any, level: Access, what: str) -> nn.Module:
    """The teacher's module, after checking the handle gives `level`."""
    if isinstance(teacher, nn.Module):
        return teacher
    require(teacher, level, what)
    return teacher.model


def smoke_teacher(seed: int) -> nn.Module:
    """A tiny BatchNorm CNN (8×8 inputs) with non-trivial running statistics."""
    from lfm.distill.vision import CNN

    torch.manual_seed(seed)
    model = CNN((4, 8, 8)).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 8, 8))
    return model.eval()


@dataclass
class GameResult:
    """What a generator / student game returns."""

    student: nn.Module
    generator: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    queries: int = 0  # teacher forward passes on single images


def play(
    iterations: int,
    student_steps: int,
    generator_step: Callable[[], dict[str, float]],
    student_step: Callable[[], dict[str, float]],
) -> list[dict[str, float]]:
    """Alternate one generator update with `student_steps` student updates; log the last ones."""
    history = []
    for _ in range(iterations):
        logged = generator_step()
        for _ in range(student_steps):
            s_logged = student_step()
        history.append({**logged, **s_logged})
    return history


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sample(gen: Generator, n: int, g: torch.Generator) -> torch.Tensor:
    """n images from the generator in train mode (BatchNorm on batch statistics, as the papers).

    The running statistics lag a generator that changes every step, so eval mode would hand the
    student other images than those the generator was optimised for.
    """
    return gen.train()(torch.randn(n, gen.nz, generator=g))


def smoke_game(fn: Callable, cfg: Config, seed: int, teacher_fn=smoke_teacher) -> torch.Tensor:
    """Two iterations of a generator / student game on 8×8 images; the last losses."""
    from lfm.distill.vision import CNN

    torch.manual_seed(seed)
    student = CNN((2, 4, 4))
    gen = Generator(nz=8, size=8, width=4)
    cfg = cfg.replace(iterations=2, student_steps=1, batch_size=4, nz=8)
    res = fn(teacher_fn(seed), student, cfg, generator=gen, seed=seed)
    return torch.tensor([list(h.values()) for h in res.history])
