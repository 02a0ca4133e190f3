"""Distillation from a teacher that gives only text (TEXT access).

- Sequence-level KD (Kim & Rush 2016, arXiv 1606.07947): the teacher's sequence distribution is
  approximated by its mode, `ŷ ≈ argmax_y p_t(y | x)` (beam search in the paper; greedy decoding,
  i.e. beam size 1, by default here), and the student is trained on it with the LM loss
  `L = −log p_s(ŷ | x)`, a mean over the generated tokens (and EOS); prompt tokens are not scored.
- Distilling step-by-step (Hsieh et al. 2023, arXiv 2305.02301): the teacher gives a label ŷ and a
  rationale r̂ for each input; the student learns both as two tasks told apart by a prefix,
  `L = L_label + λ · L_rationale` (λ = 1 in the paper), each a mean token NLL.

Both run through `lfm.core.train.train`; the teacher is asked once, before training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lfm.access import Access, LocalModel, narrow
from lfm.config import Config
from lfm.core.tiny import tiny_lm
from lfm.core.train import TrainConfig, shuffled_batches, train
from lfm.distill.contract import DISTILLER, DistillResult
from lfm.registry import Example, register
from lfm.runs import Run

IGNORE = -100  # label of positions that are not scored (prompt and padding)


class SeqKDConfig(Config):
    max_new_tokens: int = Field(32, ge=1)  # length of the teacher's generations
    temperature: float = Field(0.0, ge=0)  # 0: greedy decoding (the mode, beam size 1)
    batch_size: int = Field(8, ge=1)  # sequences per micro-batch


class StepByStepConfig(Config):
    rationale_weight: float = Field(1.0, ge=0)  # λ, weight of the rationale task (paper: 1)
    max_new_tokens: int = Field(64, ge=1)  # length of the teacher's labels and rationales
    label_prefix: str = "[label] "  # task prefix of the label task (paper: "[label]")
    rationale_prefix: str = "[rationale] "  # task prefix of the rationale task ("[rationale]")
    label_prompt: str = "{input}\nAnswer:"  # how the teacher is asked for a label
    rationale_prompt: str = "{input}\nLet's think step by step:"  # ... and for a rationale
    batch_size: int = Field(8, ge=1)  # inputs per micro-batch (each gives both tasks)


def teacher_generations(
    teacher: Any, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0
) -> list[str]:
    """The teacher's continuation of each prompt; any handle with TEXT access will do."""
    kw = {"temperature": temperature} if temperature > 0 else {}
    return list(teacher.generate(list(prompts), max_new_tokens=max_new_tokens, **kw))


def encode_pairs(
    encode: Callable[[str], list[int]],
    pairs: Sequence[tuple[str, str]],
    eos_id: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, L) and labels (N, L): targets and EOS scored, the prompt not.

    Args:
        encode: text → token ids, without special tokens.
        pairs: (prompt, target) texts.
        eos_id: appended after each target (the student learns where to stop).
        pad_id: fills the right padding (its label is `IGNORE`).
    """
    seqs = [(encode(p), [*encode(t), eos_id]) for p, t in pairs]
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    for i, (p, t) in enumerate(seqs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    return ids, labels


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the scored tokens: position t predicts label t+1; logits (B, L, V)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def _seq_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    ids, labels = batch
    return sequence_nll(model(input_ids=ids).logits, labels)


def _encoder(student: LocalModel) -> tuple[Callable[[str], list[int]], int, int]:
    tok = student.tokenizer
    return student.encode, int(tok.eos_token_id), int(tok.pad_token_id)


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _pair(level: Access, seed: int) -> tuple[Any, LocalModel]:
    """A tiny Llama teacher (its handle at `level`) and a tiny Llama student of another seed."""
    teacher = narrow(LocalModel(*tiny_lm("llama", seed), name="teacher"), level)
    return teacher, LocalModel(*tiny_lm("llama", seed + 1), name="student")


def _summary(result: DistillResult) -> dict[str, Any]:
    return {"losses": torch.tensor(result.history.losses), **result.info}


def _seq_example(level: Access, seed: int) -> Example:
    teacher, student = _pair(level, seed)
    prompts = ["The capital of Italy is", "Paris is the capital of", "Tokyo is a", "A small model"]
    kw = {"train_cfg": TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False)}
    cfg = SeqKDConfig(max_new_tokens=6, batch_size=2)
    return Example((teacher, student, prompts), kw, cfg, summary=_summary)


# pragma: no mutate end


def seq_kd(
    teacher: Any,
    student: LocalModel,
    data: Sequence[str],
    cfg: SeqKDConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    run: Run | None = None,
) -> DistillResult:
    """Train `student` in place on the teacher's generations.

    Args:
        teacher: any handle with TEXT access (`generate(prompts, max_new_tokens)`).
        student: a `LocalModel` (its tokenizer encodes prompts and generations).
        data: the prompts the teacher continues.
        cfg: generation length, temperature and batch size (resolved by the registry).
        train_cfg: the shared loop's steps, learning rate and seed (None: `TrainConfig()`).
        run: a run directory for metrics and checkpoints.

    Returns:
        the student's module, the loop's `History`, and in `info` the teacher's generations
        (`targets`).
    """
    train_cfg = train_cfg or TrainConfig()
    prompts = list(data)
    targets = teacher_generations(teacher, prompts, cfg.max_new_tokens, cfg.temperature)
    encode, eos, pad = _encoder(student)
    ids, labels = encode_pairs(encode, list(zip(prompts, targets, strict=True)), eos, pad)
    batches = shuffled_batches(ids, labels, batch_size=min(cfg.batch_size, len(ids)),
                               seed=train_cfg.seed)  # fmt: skip
    hist = train(student.model, _seq_loss, batches, train_cfg, run)
    return DistillResult(student.model, hist, {"targets": targets})


seq_kd = register(
    "distill", "seq_kd", shape=DISTILLER, branch="with data", access=Access.TEXT,
    config=SeqKDConfig, paper="Kim & Rush 2016, arXiv 1606.07947", example=_seq_example,
    cli="lfm distill lm --method seq_kd",
)(seq_kd)  # fmt: skip


def step_by_step_loss(model: nn.Module, batch: Any, rationale_weight: float) -> dict:
    """`{"loss", "label", "rationale"}`: L_label + λ · L_rationale on one batch of both tasks."""
    label_ids, label_y, rat_ids, rat_y = batch
    parts = {
        "label": sequence_nll(model(input_ids=label_ids).logits, label_y),
        "rationale": sequence_nll(model(input_ids=rat_ids).logits, rat_y),
    }
    loss = parts["label"] + rationale_weight * parts["rationale"]
    return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


def _ask(teacher: Any, template: str, inputs: Sequence[str], max_new_tokens: int) -> list[str]:
    prompts = [template.format(input=x) for x in inputs]
    return [g.strip() for g in teacher_generations(teacher, prompts, max_new_tokens)]


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _sbs_example(level: Access, seed: int) -> Example:
    teacher, student = _pair(level, seed)
    kw = {"train_cfg": TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False)}
    cfg = StepByStepConfig(max_new_tokens=6, batch_size=2)
    return Example((teacher, student, ["2+2", "3+1", "1+1", "0+5"]), kw, cfg, summary=_summary)


# pragma: no mutate end


def step_by_step(
    teacher: Any,
    student: LocalModel,
    data: Sequence[str],
    cfg: StepByStepConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    labels: Sequence[str] | None = None,
    run: Run | None = None,
) -> DistillResult:
    """Multi-task training on the teacher's labels and rationales.

    Args:
        teacher: any handle with TEXT access; asked with `cfg.rationale_prompt` (and with
            `cfg.label_prompt` unless `labels` are given).
        student: a `LocalModel` trained in place.
        data: the task inputs.
        cfg: λ, task prefixes, prompts and generation length (resolved by the registry).
        train_cfg: the shared loop's steps, learning rate and seed (None: `TrainConfig()`).
        labels: gold labels (the paper's "standard fine-tuning" setting); None: the teacher's.
        run: a run directory for metrics and checkpoints.

    Returns:
        the student's module, the loop's `History`, and in `info` the `labels` and `rationales`
        it learnt.
    """
    train_cfg = train_cfg or TrainConfig()
    inputs = list(data)
    rationales = _ask(teacher, cfg.rationale_prompt, inputs, cfg.max_new_tokens)
    if labels is None:
        labels = _ask(teacher, cfg.label_prompt, inputs, cfg.max_new_tokens)
    encode, eos, pad = _encoder(student)
    label_t = encode_pairs(encode, [(cfg.label_prefix + x, y) for x, y in zip(inputs, labels, strict=True)], eos, pad)  # fmt: skip
    rat_t = encode_pairs(encode, [(cfg.rationale_prefix + x, r) for x, r in zip(inputs, rationales, strict=True)], eos, pad)  # fmt: skip
    batches = shuffled_batches(*label_t, *rat_t, batch_size=min(cfg.batch_size, len(inputs)),
                               seed=train_cfg.seed)  # fmt: skip

    def loss_fn(model: nn.Module, batch: Any) -> dict:
        return step_by_step_loss(model, batch, cfg.rationale_weight)

    hist = train(student.model, loss_fn, batches, train_cfg, run)
    return DistillResult(student.model, hist, {"labels": list(labels), "rationales": rationales})


step_by_step = register(
    "distill", "step_by_step", shape=DISTILLER, branch="with data", access=Access.TEXT,
    config=StepByStepConfig, paper="Hsieh et al. 2023, arXiv 2305.02301", example=_sbs_example,
    cli="none: it needs task inputs and a teacher that writes rationales (call it from Python)",
)(step_by_step)  # fmt: skip
