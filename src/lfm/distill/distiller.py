"""The distiller: a teacher handle, a student module and weighted losses, on the shared loop.

    distill(teacher, student, batches, losses=[("kd", 0.9, KDConfig(temperature=4)),
                                               ("fitnets", 1.0, None, "conv2", "block2")])

Each loss is `(name, weight, cfg)` for a logit loss, or `(name, weight, cfg, student_module,
teacher_module)` for a feature loss. The total is `Σ weight · loss + label_weight · CE(student,
labels)`. A registered loss run by name (`run("distill/kd", teacher, student, data)`) is this
distiller with one term.

The teacher is read through the least its losses need: a white-box teacher (a `LocalClassifier`
or a module) runs once per batch with forward hooks on the named modules, frozen and in eval mode;
a narrowed handle answers `scores(x)` and, for feature losses, `hidden(x, modules)` (a HIDDEN
handle), and is never reached past that interface. Every loss's access level is checked against
the teacher before training, so a feature loss on a SCORES handle is refused. Student features
keep their gradients; the teacher runs without them. A loss registered with a `projector` (FitNets'
regressor) gets one per term, shaped from one probe batch and trained with the student.

The student may be a causal LM and the batches token rows (B, T): the logits are then the LM's
(B, T, V), the teacher's features come from `hidden(rows, modules)` (a local handle, or a server
at HIDDEN answering token ids), and `label_weight` weighs the LM loss (each position's next
token). So FitNets' hint between two transformer blocks runs as it does between two CNN layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lfm.access import Access, access_of, module_of
from lfm.config import Config
from lfm.core.hooks import capture, frozen
from lfm.core.train import History, TrainConfig, lm_loss, train
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
        spec = get(item[0], area="distill")
        if spec.shape.name != "loss":
            raise ConfigError(f"{spec.key} is a whole method, not a loss the distiller can weigh")
        terms.append(Term(spec, float(item[1]), spec.resolve(item[2]), *item[3:]))
    return terms


def check_access(teacher: Any, terms: Sequence[Term]) -> None:
    """Raise `AccessError` if the teacher handle gives less than some loss needs."""
    for term in terms:
        term.spec.check(teacher)
        if term.teacher and access_of(teacher) < Access.HIDDEN:
            raise AccessError(f"{term.spec.key} on module {term.teacher!r} needs HIDDEN access")
    white = access_of(teacher) >= Access.WEIGHTS
    if not white and _reads_logits(terms) and not callable(getattr(teacher, "scores", None)):
        raise AccessError(
            f"{type(teacher).__name__} gives no class scores for a logit loss; a language "
            "model's teacher sends top-k log-probabilities: use distill/topk_lm"
        )


def _reads_logits(terms: Sequence[Term]) -> bool:
    return any(not t.teacher for t in terms)


def _logits(out: Any) -> torch.Tensor:
    """A module's logits: the tensor itself, or a transformers output's `.logits`."""
    return out.logits if hasattr(out, "logits") else out


class Student(nn.Module):
    """The student and the loss terms' projectors: what the training loop optimises."""

    def __init__(self, student: nn.Module, modules: Sequence[str]):
        super().__init__()
        self.student = student
        self.modules_ = list(modules)
        self.projectors = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with capture(self.student, self.modules_, detach=False) as acts:
            logits = _logits(self.student(x))
        return logits, dict(acts)


@torch.no_grad()
def teacher_outputs(
    teacher: Any, x: torch.Tensor, modules: Sequence[str], logits: bool = True
) -> tuple[Any, dict]:
    """Teacher log-probabilities (when `logits`) and features at `modules`: one pass when it
    holds weights, else through the handle's `scores` and `hidden`."""
    if access_of(teacher) >= Access.WEIGHTS:
        model = module_of(teacher)
        with capture(model, modules) as acts:
            out = _logits(model(x)).float().log_softmax(-1)
        return out, dict(acts)
    scores = teacher.scores(x) if logits else None
    return scores, (teacher.hidden(x, modules) if modules else {})


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, list | tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _key(term: Term, i: int, terms: Sequence[Term]) -> str:
    unique = sum(t.spec.name == term.spec.name for t in terms) == 1
    return term.spec.name if unique else f"{term.spec.name}{i}"


def add_projectors(model: Student, teacher: Any, terms: Sequence[Term], x: torch.Tensor, seed: int):
    """Create each projected term's projector from one probe batch's feature shapes."""
    wanted = [(i, t) for i, t in enumerate(terms) if t.spec.extras.get("projector")]
    if not wanted:
        return
    modules = [t.teacher for _, t in wanted if t.teacher]
    t_logits, t_feats = teacher_outputs(teacher, x, modules, _reads_logits([t for _, t in wanted]))
    with torch.no_grad():
        s_logits, s_feats = model(x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i, t in wanted:
            s = s_feats[t.student] if t.student else s_logits
            tt = t_feats[t.teacher] if t.teacher else t_logits
            model.projectors[str(i)] = t.spec.extras["projector"](s.shape, tt.shape)


def make_loss_fn(teacher: Any, terms: Sequence[Term], label_weight: float):
    """`loss_fn(model, batch) -> {"loss", parts...}` for the shared training loop."""
    t_modules = sorted({t.teacher for t in terms if t.teacher})
    logits = _reads_logits(terms)

    def loss_fn(model: Student, batch: Any) -> dict[str, torch.Tensor]:
        x, y = _unpack(batch)
        t_logits, t_feats = teacher_outputs(teacher, x, t_modules, logits)
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
        elif label_weight and s_logits.dim() == 3 and not x.is_floating_point():
            parts["lm"] = lm_loss(s_logits, x)  # token rows: each position's next token
            total = total + label_weight * parts["lm"]
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

    return loss_fn


def _first(batches: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first batch, and an iterable that still yields it when `batches` is an iterator."""
    it = iter(batches)
    first = next(it)
    return first, (itertools.chain([first], it) if it is batches else batches)


def train_terms(
    teacher: Any,
    student: nn.Module,
    batches: Iterable[Any],
    terms: Sequence[Term],
    train_cfg: TrainConfig | None = None,
    label_weight: float = 0.0,
    run: Run | None = None,
    evaluate: Any = None,
) -> History:
    """`distill` on terms already read (`as_terms`): check access, then train in place."""
    check_access(teacher, terms)
    train_cfg = train_cfg or TrainConfig()
    white = access_of(teacher) >= Access.WEIGHTS
    # a white-box teacher's BatchNorm and dropout act as at inference, and it gets no gradients
    hold = frozen(module_of(teacher), train=False) if white else nullcontext()
    model = Student(student, sorted({t.student for t in terms if t.student}))
    first, batches = _first(batches)
    ev = (lambda m: evaluate(m.student)) if evaluate is not None else None
    with hold:
        add_projectors(model, teacher, terms, _unpack(first)[0], train_cfg.seed)
        loss_fn = make_loss_fn(teacher, terms, label_weight)
        return train(model, loss_fn, batches, train_cfg, run, ev)


def distill(
    teacher: Any,
    student: nn.Module,
    batches: Iterable[Any],
    losses: Sequence[tuple],
    train_cfg: TrainConfig | None = None,
    label_weight: float = 0.0,
    run: Run | None = None,
    evaluate: Any = None,
) -> History:
    """Train `student` in place from `teacher` through the shared training loop.

    Args:
        teacher: a `LocalClassifier` or module (WEIGHTS), or a narrowed handle: `scores(x)`
            (SCORES) for logit losses, `hidden(x, modules)` too (HIDDEN) for feature losses.
        student: an `nn.Module` mapping inputs to logits.
        batches: micro-batches `x` or `(x, labels)`, cycled by the loop.
        losses: `(name, weight, cfg[, student_module, teacher_module])` per registered loss;
            `cfg` is the loss's config, a mapping, or None for its defaults.
        train_cfg: the training loop's config (None: `TrainConfig()`).
        label_weight: weight of cross-entropy on the labels (0 for pure distillation).
        run: a run directory for metrics and checkpoints (resumed when it holds one).
        evaluate: `evaluate(student) -> {name: value}` at the loop's evaluation steps.
    """
    terms = as_terms(losses)
    return train_terms(teacher, student, batches, terms, train_cfg, label_weight, run, evaluate)
