"""The callable shapes of distillation.

- `Loss`: `(student, teacher, cfg) -> Tensor` on the two models' outputs (logits or features).
  `run("distill/kd", teacher, student, data, cfg=...)` trains `student` with that loss through the
  distiller and returns a `DistillResult`.
- `Distiller`: `(teacher, student, data, cfg) -> DistillResult`, a whole method. Data-free ones
  take as `data` what they need to know of the inputs they never see (an `InputSpec`), or None
  where a generator they are given says it.

The teacher is the handle whose access is checked; the student is always a module we train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from lfm.registry import shape


@dataclass
class DistillResult:
    """A trained student (trained in place when one was given) and what the run recorded."""

    student: nn.Module
    history: Any = None  # the training loop's `History`, or the method's own record
    info: Mapping[str, Any] = field(default_factory=dict)  # queries, images made, final metrics


@dataclass(frozen=True)
class InputSpec:
    """What a data-free distiller knows of the teacher's inputs: their shape and the classes."""

    shape: tuple[int, ...]  # one input, e.g. (1, 28, 28) for a grey image
    n_classes: int = 0  # the teacher's classes (DeepInversion's targets cycle through them)


class Loss(Protocol):
    def __call__(self, student: Tensor, teacher: Tensor, cfg: Any) -> Tensor: ...


class Distiller(Protocol):
    def __call__(self, teacher: Any, student: Any, data: Any, cfg: Any = None) -> DistillResult: ...


def train_with_loss(
    spec: Any,
    teacher: Any,
    student: nn.Module,
    data: Any,
    *,
    cfg: Any = None,
    train_cfg: Any = None,
    label_weight: float = 0.0,
    student_module: str = "",
    teacher_module: str = "",
    run: Any = None,
    evaluate: Any = None,
) -> DistillResult:
    """Train `student` in place on `data` with the registered loss `spec` through the distiller.

    Args:
        teacher: a handle at the loss's level (SCORES for logit losses, HIDDEN for features).
        student: the module trained (in place).
        data: micro-batches `x` or `(x, labels)`, cycled by the training loop.
        cfg: the loss's config.
        train_cfg: the training loop's `TrainConfig` (None: its defaults).
        label_weight: weight of cross-entropy on the labels beside the loss.
        student_module, teacher_module: modules whose outputs the loss compares (feature losses);
            empty: the logits.
        run, evaluate: as `lfm.distill.distill`.
    """
    from lfm.distill.distiller import Term, train_terms

    term = Term(spec, 1.0, spec.resolve(cfg), student_module, teacher_module)
    history = train_terms(teacher, student, data, [term], train_cfg, label_weight, run, evaluate)
    return DistillResult(student, history)


LOSS = shape("distill", "loss", Loss, handles="teacher", call=train_with_loss)
DISTILLER = shape("distill", "distiller", Distiller, handles="teacher")
