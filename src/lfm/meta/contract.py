"""The callable shape of meta learning.

`Learner`: `(model, tasks, cfg) -> MetaResult`, the method chosen by its registered name. `tasks`
is a task source (`SinusoidTasks`, `EpisodeTasks`: from data) or a `ModelPool` (data-free: the
tasks are recovered from pretrained models). The access a method declares is checked on what it
learns from: the pool's handles for data-free methods, else the model it meta-trains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from lfm.registry import shape


@dataclass
class History:
    """Meta-training record."""

    loss: list[float] = field(default_factory=list)  # meta-loss per outer step
    inner_lrs: dict[str, Any] | None = None  # learned per-parameter step sizes (Meta-SGD)
    queries: int = 0  # inputs sent to black-box pool models (data-free, black-box)


@dataclass
class MetaResult:
    """A meta-trained model (a copy: the caller's is not changed) and its record."""

    model: nn.Module
    history: History
    method: str  # the registered key, e.g. "meta/maml": meta-testing adapts the same way


@dataclass(frozen=True)
class ModelPool:
    """Pretrained models to meta-learn from without their data (data-free meta-learning).

    Args:
        handles: one handle per pool model (WEIGHTS for white-box methods, SCORES for black-box).
        input_shape: the shape of one input, e.g. (1, 28, 28).
    """

    handles: Sequence[Any]
    input_shape: tuple[int, ...]


class Learner(Protocol):
    def __call__(self, model: Any, tasks: Any, cfg: Any = None) -> MetaResult: ...


def _handles(arguments: Mapping[str, Any]) -> list[Any]:
    tasks = arguments.get("tasks")
    if isinstance(tasks, ModelPool):
        return list(tasks.handles)
    return [arguments.get("model")]


LEARNER = shape("meta", "learner", Learner, handles=_handles)
