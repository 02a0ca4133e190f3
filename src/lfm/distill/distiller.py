"""The distiller: a teacher handle, a student module and weighted losses, on the shared loop.

    distill(teacher, student, batches, losses=[("kd", 0.9, KDConfig(temperature=4)),
                                               ("fitnets", 1.0, None, "conv2", "block2")])

Each loss is `(name, weight, cfg)` for a logit loss, or `(name, weight, cfg, student_module,
teacher_module)` for a feature loss: features are read by forward hooks on the named modules, so
neither model is changed. The total is `Σ weight · loss + label_weight · CE(student, labels)`.
The teacher is a `LocalClassifier` (WEIGHTS) or a narrowed handle; every loss checks the handle
gives its access level (`lfm.access.require`), so a feature loss on a SCORES handle is refused.
Student features keep their gradients; the teacher runs without them. FitNets' regressors are
trained with the student (their shapes come from one probe batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfm.access import Access, access_of, capture, require
from lfm.config import Config
from lfm.core.train import History, TrainConfig, train
from lfm.distill.features import PROJECTED, HintProjector
from lfm.errors import AccessError, ConfigError
from lfm.registry import MethodSpec, get
from lfm.runs import Run


@dataclass(frozen=True)
class Term:
    """One weighted loss; `student`/`teacher` name modules ("" means the logits)."""

    spec: MethodSpec
    weight: float
    cfg: Config
    student: str = ""
    teacher: str = ""


def as_terms(losses: Sequence[tuple]) -> list[Term]:
    """Read `(name, weight, cfg[, student_module, teacher_module])` tuples; cfg None = defaults."""
    terms = []
    for item in losses:
        if len(item) not in (3, 5):
            raise ConfigError(f"a loss is (name, weight, cfg[, student, teacher]), not {item!r}")
        spec = get(f"distill/{item[0]}")
        cfg = item[2] if item[2] is not None else spec.config()
        if not isinstance(cfg, spec.config):
            cfg = spec.config.build(dict(cfg))
        terms.append(Term(spec, float(item[1]), cfg, *item[3:]))
    return terms


def check_access(teacher: Any, terms: Sequence[Term]) -> None:
    """Raise `AccessError` if the teacher handle gives less than some loss needs."""
    for term in terms:
        require(teacher, term.spec.access, term.spec.key)
        if term.teacher and access_of(teacher) < Access.HIDDEN:
            raise AccessError(f"{term.spec.key} on module {term.teacher!r} needs HIDDEN access")


class Student(nn.Module):
    """The student and the FitNets regressors: what the training loop optimises."""

    def __init__(self, student: nn.Module, modules: Sequence[str]):
        super().__init__()
        self.student = student
        self.modules_ = list(modules)
        self.projectors = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with capture(self.student, self.modules_, detach=False) as acts:
            logits = self.student(x)
        return logits, dict(acts)


@torch.no_grad()
def teacher_outputs(teacher: Any, x: torch.Tensor, modules: Sequence[str]) -> tuple[Any, dict]:
    """Teacher log-probabilities and features at `modules`, in one pass when it holds weights."""
    if modules and hasattr(teacher, "model"):
        with capture(teacher.model, modules) as acts:
            logits = teacher.model(x).float().log_softmax(-1)
        return logits, dict(acts)
    return teacher.scores(x), (teacher.hidden(x, modules) if modules else {})


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _key(term: Term, i: int, terms: Sequence[Term]) -> str:
    unique = sum(t.spec.name == term.spec.name for t in terms) == 1
    return term.spec.name if unique else f"{term.spec.name}{i}"


def add_projectors(model: Student, teacher: Any, terms: Sequence[Term], x: torch.Tensor, seed: int):
    """Create a `HintProjector` for each projected term from one probe batch's feature shapes."""
    wanted = [(i, t) for i, t in enumerate(terms) if t.spec.name in PROJECTED]
    if not wanted:
        return
    t_logits, t_feats = teacher_outputs(teacher, x, [t.teacher for _, t in wanted if t.teacher])
    with torch.no_grad():
        s_logits, s_feats = model(x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, t in wanted:
            s = s_feats[t.student] if t.student else s_logits
            tt = t_feats[t.teacher] if t.teacher else t_logits
            model.projectors[str(i)] = HintProjector(s.shape, tt.shape)


def make_loss_fn(teacher: Any, terms: Sequence[Term], label_weight: float):
    """`loss_fn(model, batch) -> {"loss", parts...}` for the shared training loop."""
    t_modules = sorted({t.teacher for t in terms if t.teacher})

    def loss_fn(model: Student, batch: Any) -> dict[str, torch.Tensor]:
        x, y = _unpack(batch)
        t_logits, t_feats = teacher_outputs(teacher, x, t_modules)
        s_logits, s_feats = model(x)
        parts, total = {}, s_logits.new_zeros(())
        for i, term in enumerate(terms):
            s = s_feats[term.student] if term.student else s_logits
            if str(i) in model.projectors:
                s = model.projectors[str(i)](s)
            t = t_feats[term.teacher] if term.teacher else t_logits
            parts[_key(term, i, terms)] = part = term.spec.fn(s, t, term.cfg)
            total = total + term.weight * part
        if label_weight and y is not None:
            parts["ce"] = F.cross_entropy(s_logits, y)
            total = total + label_weight * parts["ce"]
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

    return loss_fn


def _first(batches: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first batch, and an iterable that still yields it when `batches` is an iterator."""
    it = iter(batches)
    first = next(it)
    return first, (itertools.chain([first], it) if it is batches else batches)


def distill(
    teacher: Any,
    student: nn.Module,
    batches: Iterable[Any],
    losses: Sequence[tuple],
    cfg: TrainConfig = TrainConfig(),
    label_weight: float = 0.0,
    run: Run | None = None,
    evaluate: Any = None,
) -> History:
    """Train `student` in place from `teacher` through the shared training loop.

    Args:
        teacher: a `LocalClassifier` or a narrowed handle (`scores(x)`; `hidden` for features).
        student: an `nn.Module` mapping inputs to logits.
        batches: micro-batches `x` or `(x, labels)`, cycled by the loop.
        losses: `(name, weight, cfg[, student_module, teacher_module])` per registered loss.
        cfg: the training loop's config.
        label_weight: weight of cross-entropy on the labels (0 for pure distillation).
        run: a run directory for metrics and checkpoints (resumed when it holds one).
        evaluate: `evaluate(student) -> {name: value}` at the loop's evaluation steps.
    """
    terms = as_terms(losses)
    check_access(teacher, terms)
    if hasattr(teacher, "model"):
        teacher.model.eval()  # a teacher's BatchNorm and dropout act as at inference
    model = Student(student, sorted({t.student for t in terms if t.student}))
    first, batches = _first(batches)
    add_projectors(model, teacher, terms, _unpack(first)[0], cfg.seed)
    ev = (lambda m: evaluate(m.student)) if evaluate is not None else None
    return train(model, make_loss_fn(teacher, terms, label_weight), batches, cfg, run, ev)
