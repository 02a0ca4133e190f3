"""Layer-dropped language-model students (Sanh et al. 2019, DistilBERT, arXiv 1910.01108).

The student is the teacher with fewer blocks: it keeps the embeddings, the final norm, the LM head
and every k-th block (blocks `offset, offset + k, ...`), copied exactly; where the blocks live comes
from `lfm.core.layouts`, so no code branches on the model type. A student may also be built from a
config. It is trained on fixed-length token blocks of offline text with

    L = α_kd · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + α_lm · CE(z_s[:, :-1], x[:, 1:])

where the KD term covers every token position (`lfm.distill.losses.kd_loss`) and CE is the causal
LM loss. DistilBERT weighs its soft-target loss 5 and its (masked) LM loss 2 and uses T = 2; those
are the defaults here. Held-out perplexity is `exp` of the mean next-token NLL over test blocks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access, LocalModel, module_of, narrow
from lfm.config import Config
from lfm.core.hooks import frozen
from lfm.core.layouts import get_layout, num_layers
from lfm.core.tiny import tiny_lm
from lfm.core.train import TrainConfig, lm_loss, shuffled_batches, train
from lfm.distill.contract import DISTILLER, DistillResult
from lfm.distill.losses import KDConfig, kd_loss
from lfm.errors import ConfigError
from lfm.registry import Example, register
from lfm.runs import Run


class LMStudentConfig(Config):
    every: int = Field(2, ge=1)  # keep one block in `every` (DistilBERT: 2, i.e. half the layers)
    offset: int = 0  # index of the first kept block; negative counts from the top (−1: last)
    temperature: float = Field(2.0, gt=0)  # KD temperature T (DistilBERT: 2)
    kd_weight: float = Field(5.0, ge=0)  # α_kd, weight of the soft-target loss (DistilBERT: 5)
    lm_weight: float = Field(2.0, ge=0)  # α_lm, weight of the LM loss (DistilBERT: 2, on MLM)
    block_size: int = Field(128, ge=2)  # tokens per training block
    batch_size: int = Field(8, ge=1)  # blocks per micro-batch


def kept_blocks(n_layers: int, every: int, offset: int = 0) -> list[int]:
    """Indices of the teacher blocks the student keeps: `offset, offset + every, ...` (a negative
    offset counts from the top, as in Python: −1 keeps the last block only)."""
    if not -n_layers <= offset < n_layers:
        raise ConfigError(
            f"offset {offset} leaves no block of a {n_layers}-layer teacher: give "
            f"0 … {n_layers - 1}, or −{n_layers} … −1 counted from the top"
        )
    return list(range(offset % n_layers, n_layers, every))


def student_config(teacher: nn.Module, keep: Sequence[int]) -> Any:
    """The teacher's config with only the kept blocks (per-layer lists are subset too)."""
    cfg = copy.deepcopy(teacher.config)
    layer_types = getattr(cfg, "layer_types", None)
    cfg.num_hidden_layers = len(keep)
    if isinstance(layer_types, list | tuple):
        cfg.layer_types = [layer_types[i] for i in keep]
    return cfg


def map_state_dict(state: dict[str, torch.Tensor], layers: str, keep: Sequence[int]) -> dict:
    """Rename block `keep[j]` to block `j`; drop the other blocks; keep every other tensor."""
    new_index = {old: new for new, old in enumerate(keep)}
    prefix = layers + "."
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value.clone()
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        if int(index) in new_index:
            out[f"{prefix}{new_index[int(index)]}.{rest}"] = value.clone()
    return out


def student_from_teacher(teacher: nn.Module, every: int = 2, offset: int = 0) -> nn.Module:
    """A student holding exact copies of the teacher's embeddings, head, norm and every k-th block.

    Args:
        teacher: a causal LM with a known layout (`lfm.core.layouts`); it is not changed.
        every: keep one block in `every`.
        offset: the first kept block.
    """
    from transformers import AutoModelForCausalLM

    keep = kept_blocks(num_layers(teacher), every, offset)
    param = next(teacher.parameters())
    student = AutoModelForCausalLM.from_config(student_config(teacher, keep), dtype=param.dtype)
    state = map_state_dict(teacher.state_dict(), get_layout(teacher).layers, keep)
    student.load_state_dict(state, strict=True)
    return student.to(param.device)


def student_from_config(config: Any, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM from a transformers config (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def token_blocks(tokenizer: Any, texts: Sequence[str], block_size: int, max_blocks: int = 0):
    """Texts joined with EOS between them and cut into (N, block_size) token blocks.

    Args:
        tokenizer: a Hugging Face tokenizer (its EOS token separates the texts).
        texts: the documents, in order.
        block_size: tokens per block; the remainder at the end is dropped.
        max_blocks: stop once this many blocks exist (0: no limit).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        if max_blocks and len(ids) >= max_blocks * block_size:
            break
    n = len(ids) // block_size
    n = min(n, max_blocks) if max_blocks else n
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents; a one-line `ConfigError` if it is missing, not UTF-8 or
    blank."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{path} holds no text")
    return text


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """The first `train_fraction` of a text's characters (for training) and the rest."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


def most_tokens(text: str) -> int:
    """An upper bound on the tokens `token_blocks` makes of `text` with any tokenizer whose
    tokens each stand for at least one byte: its UTF-8 bytes, a leading-space token and EOS."""
    return len(text.encode("utf-8")) + 2


def lm_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    ids: torch.Tensor,
    cfg: LMStudentConfig,
) -> dict[str, torch.Tensor]:
    """`{"loss", "kd", "lm"}`: KD on every position plus the LM loss, weighted as in `cfg`."""
    parts = {"lm": lm_loss(student_logits, ids)}
    total = cfg.lm_weight * parts["lm"]
    if teacher_logits is not None and cfg.kd_weight:
        parts["kd"] = kd_loss(student_logits, teacher_logits, KDConfig(temperature=cfg.temperature))
        total = total + cfg.kd_weight * parts["kd"]
    return {"loss": total, **{k: v.detach() for k, v in parts.items()}}


def make_loss_fn(teacher: nn.Module | None, cfg: LMStudentConfig):
    """`loss_fn(student, (ids,))` for the shared loop; `teacher` None trains with LM loss only."""

    def loss_fn(student: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        ids = batch[0]  # (B, T)
        t_logits = None
        if teacher is not None and cfg.kd_weight:
            with torch.no_grad():  # on the teacher's device (where it was loaded), back to ours
                at = next(teacher.parameters()).device
                t_logits = teacher(input_ids=ids.to(at)).logits.to(ids.device)
        return lm_kd_loss(student(input_ids=ids).logits, t_logits, ids, cfg)

    return loss_fn


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over (N, T) token blocks, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size].to(device)
        n = ids[:, 1:].numel()
        nll += float(lm_loss(model(input_ids=ids).logits, ids)) * n
        count += n
    return math.exp(nll / max(count, 1))


def _example(level: Access, seed: int) -> Example:
    """Three KD + LM steps of a 1-block student of the 2-block tiny Llama on random tokens."""
    teacher = narrow(LocalModel(*tiny_lm("llama", seed), name="teacher"), level)
    ids = torch.randint(3, 300, (8, 12), generator=torch.Generator().manual_seed(seed))
    cfg = LMStudentConfig(block_size=12, batch_size=4)
    kw = {"train_cfg": TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False)}
    return Example((teacher, None, ids), kw, cfg, summary=lambda r: torch.tensor(r.history.losses))


@register(
    "distill", "lm_student", shape=DISTILLER, branch="with data", access=Access.WEIGHTS,
    config=LMStudentConfig, paper="Sanh et al. 2019 (DistilBERT), arXiv 1910.01108",
    example=_example, cli="lfm distill lm --method lm_student",
)  # fmt: skip
def lm_student(
    teacher: Any,
    student: nn.Module | None,
    data: torch.Tensor,
    cfg: LMStudentConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    run: Run | None = None,
    evaluate: Any = None,
) -> DistillResult:
    """Train a layer-dropped student of `teacher` (built here when `student` is None).

    Args:
        teacher: a `LocalModel` or a causal-LM module (WEIGHTS: its blocks are copied and its
            logits read at every position); it is frozen during training.
        student: a module to train in place instead of a layer-dropped copy (e.g.
            `student_from_config`); None builds `student_from_teacher(teacher, cfg.every,
            cfg.offset)`.
        data: (N, block_size) training token blocks (`token_blocks`).
        cfg: block selection, temperature and loss weights (resolved by the registry).
        train_cfg: the shared loop's steps, learning rate and seed (None: `TrainConfig()`).
        run: a run directory for metrics and checkpoints.
        evaluate: `evaluate(student) -> {name: value}` at the loop's evaluation steps.

    Returns:
        the student (eval mode) and the loop's `History`.
    """
    model = module_of(teacher)
    train_cfg = train_cfg or TrainConfig()
    if student is None:
        student = student_from_teacher(model, cfg.every, cfg.offset)
    batches = shuffled_batches(data, batch_size=cfg.batch_size, seed=train_cfg.seed)
    with frozen(model, train=False):
        hist = train(student, make_loss_fn(model, cfg), batches, train_cfg, run, evaluate)
    return DistillResult(student.eval(), hist)
