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

from lfm.access import Access, LocalModel, require
from lfm.config import Config
from lfm.core.train import History, TrainConfig, shuffled_batches, train
from lfm.registry import register
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
    require(teacher, Access.TEXT, "sequence-level KD")
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


def _smoke_pair(seed: int) -> tuple[Any, LocalModel]:
    """A rule-based TEXT teacher and a tiny byte-level Llama student, seeded."""
    from transformers import LlamaConfig

    from lfm.distill.lm import student_from_config

    tiny = LlamaConfig(vocab_size=ByteTokenizer.vocab, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=64)  # fmt: skip
    student = LocalModel(student_from_config(tiny, seed), ByteTokenizer(), name="byte-student")
    return ReverseTeacher(), student


def _smoke_seq(cfg: SeqKDConfig, seed: int) -> torch.Tensor:
    teacher, student = _smoke_pair(seed)
    prompts = ["abc", "hello", "lfm", "kd"]
    hist = seq_kd(teacher, student, prompts, cfg.replace(max_new_tokens=6, batch_size=2),
                  TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False))[1]  # fmt: skip
    return torch.tensor(hist.losses)


@register(
    "distill", "seq_kd", branch="with data", access=Access.TEXT, config=SeqKDConfig,
    paper="Kim & Rush 2016, arXiv 1606.07947", smoke=_smoke_seq,
)  # fmt: skip
def seq_kd(
    teacher: Any,
    student: LocalModel,
    prompts: Sequence[str],
    cfg: SeqKDConfig = SeqKDConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    run: Run | None = None,
) -> tuple[list[str], History]:
    """Train `student` in place on the teacher's generations; returns them and the history.

    Args:
        teacher: any handle with TEXT access (`generate(prompts, max_new_tokens)`).
        student: a `LocalModel` (its tokenizer encodes prompts and generations).
        prompts: the inputs the teacher continues.
        cfg: generation length, temperature and batch size.
        train_cfg: the shared loop's steps, learning rate and seed.
        run: a run directory for metrics and checkpoints.
    """
    targets = teacher_generations(teacher, prompts, cfg.max_new_tokens, cfg.temperature)
    encode, eos, pad = _encoder(student)
    ids, labels = encode_pairs(encode, list(zip(prompts, targets, strict=True)), eos, pad)
    batches = shuffled_batches(ids, labels, batch_size=min(cfg.batch_size, len(ids)),
                               seed=train_cfg.seed)  # fmt: skip
    return targets, train(student.model, _seq_loss, batches, train_cfg, run)


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


def _smoke_sbs(cfg: StepByStepConfig, seed: int) -> torch.Tensor:
    teacher, student = _smoke_pair(seed)
    hist = step_by_step(teacher, student, ["2+2", "3+1", "1+1", "0+5"],
                        cfg.replace(max_new_tokens=6, batch_size=2),
                        TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False))[2]  # fmt: skip
    return torch.tensor(hist.losses)


@register(
    "distill", "step_by_step", branch="with data", access=Access.TEXT, config=StepByStepConfig,
    paper="Hsieh et al. 2023, arXiv 2305.02301", smoke=_smoke_sbs,
)  # fmt: skip
def step_by_step(
    teacher: Any,
    student: LocalModel,
    inputs: Sequence[str],
    cfg: StepByStepConfig = StepByStepConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    labels: Sequence[str] | None = None,
    run: Run | None = None,
) -> tuple[list[str], list[str], History]:
    """Multi-task training on the teacher's labels and rationales; returns both and the history.

    Args:
        teacher: any handle with TEXT access; asked with `cfg.rationale_prompt` (and with
            `cfg.label_prompt` unless `labels` are given).
        student: a `LocalModel` trained in place.
        inputs: the task inputs.
        cfg: λ, task prefixes, prompts and generation length.
        train_cfg: the shared loop's steps, learning rate and seed.
        labels: gold labels (the paper's "standard fine-tuning" setting); None: the teacher's.
        run: a run directory for metrics and checkpoints.
    """
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

    return list(labels), rationales, train(student.model, loss_fn, batches, train_cfg, run)


class ByteTokenizer:
    """UTF-8 bytes as token ids (0–255), EOS = 256, pad = 257: a tokenizer with no files."""

    vocab = 258
    eos_token, eos_token_id, pad_token_id, bos_token_id = "<eos>", 256, 257, None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ReverseTeacher:
    """A rule-based black box that answers each prompt with its reverse (TEXT access)."""

    access = Access.TEXT
    name = "reverse"

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **_: Any) -> list[str]:
        return [p[::-1][:max_new_tokens] for p in prompts]
