"""Distillation from a teacher that sends only top-k log-probabilities (SCORES, as APIs do).

Hosted APIs answer at most the top k (0-20) log-probabilities of each prompt and generated token.
Two distillers learn from that, through any handle with `top_logprobs(rows, k)`: a `LocalModel`
narrowed to SCORES, a served model (`lfm.serve.client.RemoteModel`, token ids sent with `echo`),
or a `TopKCache` of a teacher's answers saved on disk, so the teacher need not be loaded while the
student trains.

- `topk_lm`: word-level KD (Hinton et al. 2015) on every position of offline text blocks from
  the teacher's top k, plus the student's LM loss:

      L = α_kd · T² · KL(p̃_t ‖ p_s) + α_lm · CE(z_s, x)

  where p̃_t is the teacher's top-k probabilities and its remaining mass: spread evenly over the
  other tokens (`tail="uniform"`, the default: a full-vocabulary KL), or one (k+1)-th bucket
  (`"bucket"`, `lfm.distill.losses.topk_kd_loss` with `residual`), or dropped (`"drop"`: the top
  k renormalised). A bucket matches only the tail's total, so a student may pile its tail mass on
  a few wrong tokens unpunished (the two are compared in `docs/distill.md`).
  The student is a module of the teacher's vocabulary that the caller gives (a layer-dropped copy
  of a local model of the same family, or one built from a config): the teacher's weights are not
  there to copy.
- `gkd`: on-policy distillation (Agarwal et al. 2024, GKD, arXiv 2306.13649). For a share λ of the
  prompts the student samples its own continuation; for the rest the text's own continuation is
  used. The teacher scores those sequences (top-k), and the student is trained on the output
  tokens with the generalised Jensen-Shannon divergence
  `JSD(β) = β KL(p̃_t ‖ m) + (1-β) KL(p_s ‖ m)`, `m = β p̃_t + (1-β) p_s`, over the whole
  vocabulary with the teacher's tail spread evenly (p̃_t, as `topk_lm`'s default). β = 0 is
  forward KL, β = 1 reverse KL.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lfm.access import Access, LocalModel, narrow
from lfm.config import Config
from lfm.core.io import atomic_path
from lfm.core.seeding import seeded
from lfm.core.tiny import tiny_lm
from lfm.core.train import TrainConfig, lm_loss, shuffled_batches, train
from lfm.distill.contract import DISTILLER, DistillResult
from lfm.distill.lm import student_from_teacher
from lfm.distill.losses import TopKConfig, topk_kd_loss
from lfm.errors import ConfigError, LfmError
from lfm.registry import Example, register
from lfm.runs import Run

CACHE_VERSION = 1


class TopKLMConfig(Config):
    k: int = Field(20, ge=1)  # log-probabilities per position the teacher sends (APIs: ≤ 20)
    # API log-probabilities are at temperature 1; the tail bucket is exact only at T = 1
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(5.0, ge=0)  # α_kd (DistilBERT's weights, as `lm_student`)
    lm_weight: float = Field(2.0, ge=0)  # α_lm
    # the teacher's mass outside its top k: "uniform" spreads it evenly over the other tokens
    # (full-vocabulary KL), "bucket" makes it a (k+1)-th class, "drop" renormalises the top k
    tail: Literal["uniform", "bucket", "drop"] = "uniform"
    batch_size: int = Field(8, ge=1)  # blocks per micro-batch


class GKDConfig(Config):
    k: int = Field(20, ge=1)  # teacher log-probabilities per position
    on_policy: float = Field(0.5, ge=0, le=1)  # λ: share of prompts the student continues itself
    beta: float = Field(0.5, ge=0, le=1)  # β of the generalised JSD (0: forward KL, 1: reverse)
    temperature: float = Field(1.0, gt=0)  # the student's sampling temperature
    prompt_fraction: float = Field(0.5, gt=0, lt=1)  # the first part of each block is the prompt
    batch_size: int = Field(8, ge=1)  # blocks per micro-batch


# -- the teacher's answers --------------------------------------------------------------------


def teacher_topk(teacher: Any, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (values, ids), each (B, T-1, k) on `ids`' device; a one-line error when
    it sends fewer than k."""
    values, index = teacher.top_logprobs(ids.detach().cpu(), k)
    if values.shape[-1] < k:
        raise LfmError(f"the teacher sent {values.shape[-1]} log-probabilities per token, not {k}")
    return values.to(ids.device), index.to(ids.device)


class TopKCache:
    """A teacher's top-k answers on given token blocks, read back from a compressed file: a SCORES
    handle that answers `top_logprobs` for those blocks only, with no model in memory.

    Args:
        path: a file written by `cache_topk`.
    """

    access = Access.SCORES

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with np.load(self.path, allow_pickle=False) as f:
                self.meta = json.loads(str(f["meta"]))
                ids, self._values, self._index = f["ids"], f["values"], f["index"]
        except FileNotFoundError:
            raise ConfigError(f"teacher cache {self.path} does not exist") from None
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{self.path} is not a teacher cache ({e})") from None
        if self.meta.get("version") != CACHE_VERSION:
            raise ConfigError(f"{self.path} is a teacher cache of another version")
        self.k = int(self._values.shape[-1])
        self.name = f"cache of {self.meta.get('teacher', '?')}"
        self._rows = {row.tobytes(): i for i, row in enumerate(ids.astype(np.int64))}

    def __repr__(self) -> str:
        return f"TopKCache({str(self.path)!r}, k={self.k}, blocks={len(self._rows)})"

    def __len__(self) -> int:
        return len(self._rows)

    def top_logprobs(
        self, rows: Sequence[Sequence[int]] | torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if k > self.k:
            raise ConfigError(f"the cache {self.path} holds the top {self.k} per token, not {k}")
        ids = torch.as_tensor(rows if isinstance(rows, torch.Tensor) else list(rows)).long()
        at = []
        for row in ids.numpy():
            i = self._rows.get(row.astype(np.int64).tobytes())
            if i is None:
                raise ConfigError(f"a block is not in the cache {self.path}: it was made from "
                                  "other text, block size or tokenizer")  # fmt: skip
            at.append(i)
        values = torch.from_numpy(self._values[at, :, :k].astype(np.float32))
        return values, torch.from_numpy(self._index[at, :, :k].astype(np.int64))


def cache_topk(
    teacher: Any, blocks: torch.Tensor, k: int, path: str | Path, batch_size: int = 8,
    progress: bool = False,
) -> Path:  # fmt: skip
    """Ask `teacher` (any handle with `top_logprobs`) for its top-k on every block once and save
    the answers, compressed (values in float16, ids in int32), atomically.

    Returns:
        the file written (a `.npz`, read by `TopKCache`).
    """
    from tqdm.auto import tqdm

    values, index = [], []
    for i in tqdm(range(0, len(blocks), batch_size), desc="teacher top-k", disable=not progress):
        v, j = teacher_topk(teacher, blocks[i : i + batch_size], k)
        values.append(v[..., :k].half().numpy())
        index.append(j[..., :k].int().numpy())
    meta = {"version": CACHE_VERSION, "k": k, "teacher": str(getattr(teacher, "name", teacher)),
            "blocks": len(blocks), "block_size": int(blocks.shape[1])}  # fmt: skip
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, ids=blocks.int().numpy(), values=np.concatenate(values), index=np.concatenate(index),
            meta=np.array(json.dumps(meta)),
        )  # fmt: skip
    return path


# -- word-level KD on the top-k support ---------------------------------------------------------


def topk_lm_loss(
    student_logits: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor,
    cfg: TopKLMConfig,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """`{"loss", "kd", "lm"}` on (B, T) blocks: the top-k KD on positions 0 … T-2 (the ones the
    teacher's answers cover) plus the LM loss."""
    lm = lm_loss(student_logits, ids)
    parts, total = {"lm": lm}, cfg.lm_weight * lm
    if cfg.kd_weight:
        z = student_logits[:, :-1].float()
        if cfg.tail == "uniform":
            parts["kd"] = uniform_tail_kl(z, teacher, cfg.temperature)
        else:
            kcfg = TopKConfig(k=cfg.k, temperature=cfg.temperature, residual=cfg.tail == "bucket")
            parts["kd"] = topk_kd_loss(z, teacher, kcfg)
        total = total + cfg.kd_weight * parts["kd"]
    return {"loss": total, **{n: v.detach() for n, v in parts.items()}}


def uniform_tail_kl(
    student: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """`T² · KL(p̃_t ‖ p_s)` over the whole vocabulary, mean over positions, where p̃_t is the
    teacher's top-k probabilities with the remaining mass spread evenly over the other V − k
    tokens (then tempered by T). Unlike a tail bucket, this also penalises a student that piles
    its tail mass on a few wrong tokens. Computed without a (…, V) teacher tensor: the tail terms
    need only the sum of the student's log-probabilities over the tail.

    Args:
        student: student logits (..., V).
        teacher: (log-probabilities, ids), each (..., k), at temperature 1.
        temperature: T.
    """
    values, index = teacher
    vocab, k = student.shape[-1], values.shape[-1]
    t = temperature
    log_s = F.log_softmax(student.reshape(-1, vocab) / t, -1)
    v, idx = values.reshape(-1, k).float(), index.reshape(-1, k)
    rest = vocab - k
    if rest == 0:  # the whole vocabulary was sent
        log_q = F.log_softmax(v / t, -1)
        return t * t * (log_q.exp() * (log_q - log_s.gather(-1, idx))).sum(-1).mean()
    tail = torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-6))  # log of the mass outside
    log_u = tail - math.log(rest)  # each tail token's log-probability
    z = torch.logsumexp(torch.cat([v / t, (log_u / t + math.log(rest))[:, None]], -1), -1)
    log_q, log_qu = v / t - z[:, None], log_u / t - z  # tempered, normalised
    top_s = log_s.gather(-1, idx)
    tail_s = log_s.sum(-1) - top_s.sum(-1)  # Σ over the tail of log p_s
    kl_top = (log_q.exp() * (log_q - top_s)).sum(-1)
    kl_tail = log_qu.exp() * (rest * log_qu - tail_s)
    return t * t * (kl_top + kl_tail).mean()


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _examples(cfg: Config) -> Any:
    """`example(level, seed)`: three steps of a 1-block student on the top 5 of the 2-block tiny
    Llama, with `cfg`."""

    def example(level: Access, seed: int) -> Example:
        local = LocalModel(*tiny_lm("llama", seed), name="teacher")
        teacher, student = narrow(local, level), student_from_teacher(local.model, every=2)
        ids = torch.randint(3, 300, (8, 12), generator=torch.Generator().manual_seed(seed))
        kw = {"train_cfg": TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False)}
        return Example(
            (teacher, student, ids), kw, cfg, summary=lambda r: torch.tensor(r.history.losses)
        )

    return example


# pragma: no mutate end


def topk_lm(
    teacher: Any,
    student: nn.Module,
    data: torch.Tensor,
    cfg: TopKLMConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    run: Run | None = None,
    evaluate: Any = None,
) -> DistillResult:
    """Train `student` on (N, T) token blocks from the teacher's top-k log-probabilities.

    Args:
        teacher: a SCORES handle with `top_logprobs` (narrowed local model, served model, or a
            `TopKCache` of these blocks); asked once per micro-batch.
        student: a causal LM of the teacher's vocabulary, trained in place.
        data: (N, T) training token blocks.
        cfg: k, temperature, loss weights, the tail bucket.
        train_cfg, run, evaluate: the shared loop's settings, run directory and evaluation.
    """
    _same_vocab(teacher, student)
    train_cfg = train_cfg or TrainConfig()
    queries = {"blocks": 0}

    def loss_fn(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        ids = batch[0]
        top = teacher_topk(teacher, ids, cfg.k)
        queries["blocks"] += len(ids)
        return topk_lm_loss(model(input_ids=ids).logits, top, ids, cfg)

    batches = shuffled_batches(data, batch_size=cfg.batch_size, seed=train_cfg.seed)
    hist = train(student, loss_fn, batches, train_cfg, run, evaluate)
    return DistillResult(student.eval(), hist, {"teacher_blocks": queries["blocks"], "k": cfg.k})


topk_lm = register(
    "distill", "topk_lm", shape=DISTILLER, branch="with data", access=Access.SCORES,
    config=TopKLMConfig, paper="Hinton et al. 2015, arXiv 1503.02531 (on an API's top-k log-probabilities)",
    example=_examples(TopKLMConfig(k=5, batch_size=4)), cli="lfm distill lm --method topk_lm",
)(topk_lm)  # fmt: skip


def _same_vocab(teacher: Any, student: nn.Module) -> None:
    """Refuse a student whose vocabulary is smaller than the teacher's (its ids would not fit)."""
    try:  # a served teacher reads its size from its card: an unreadable card means no check
        size = getattr(teacher, "vocab_size", None)
        size = int(size) if size is not None else None
    except (LfmError, OSError, KeyError, TypeError, ValueError):
        size = None
    own = int(student.get_output_embeddings().weight.shape[0])
    if size is not None and own < size:
        raise ConfigError(
            f"the student's vocabulary ({own}) is smaller than the teacher's ({size}): top-k KD "
            "needs one vocabulary; for another tokenizer use distill/uld"
        )


# -- GKD: on-policy, generalised JSD on the top-k support --------------------------------------


def spread_tail(values: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's log-distribution over the whole vocabulary (..., V) from its top k: the k
    log-probabilities as sent, the rest of the mass spread evenly over the other tokens."""
    rest = vocab - values.shape[-1]
    if rest == 0:
        return values.new_zeros(*values.shape[:-1], vocab).scatter(-1, index, values)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-6)) - math.log(rest)
    return tail[..., None].expand(*values.shape[:-1], vocab).scatter(-1, index, values)


def generalised_jsd(log_p_t: torch.Tensor, log_p_s: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over rows of `β KL(p_t ‖ m) + (1-β) KL(p_s ‖ m)`, `m = β p_t + (1-β) p_s`; at β = 0
    it is KL(p_t ‖ p_s) and at β = 1 KL(p_s ‖ p_t) (the limits, taken exactly)."""
    if beta == 0:
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    if beta == 1:
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean()
    log_m = torch.logsumexp(
        torch.stack([log_p_t + math.log(beta), log_p_s + math.log(1 - beta)]), 0
    )
    kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def gkd_loss(
    student_logits: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], start: int,
    beta: float,
) -> torch.Tensor:  # fmt: skip
    """JSD(β) on the output positions `start-1 … T-2` (those predicting tokens `start … T-1`), over
    the whole vocabulary, the teacher's top k completed by `spread_tail` (as `topk_lm`'s default:
    buckets alone would let the student pile its tail mass on a few wrong tokens); logits
    (B, T, V), teacher (B, T-1, k) each."""
    values, index = teacher
    log_s = student_logits[:, start - 1 : -1].float().log_softmax(-1)
    log_t = spread_tail(values[:, start - 1 :].float(), index[:, start - 1 :], log_s.shape[-1])
    return generalised_jsd(log_t.to(log_s.device).flatten(0, 1), log_s.flatten(0, 1), beta)


def student_samples(
    student: nn.Module, prompts: torch.Tensor, new: int, temperature: float, seed: int
) -> torch.Tensor:
    """Prompts (B, P) continued by exactly `new` tokens sampled from the student at
    `temperature` (the whole vocabulary; EOS held back until the end), under `seed`."""
    with torch.no_grad():
        was = student.training
        student.eval()
        with seeded(seed):
            ids = student.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                pad_token_id=0,  # no row ends early (min_new_tokens), so no padding is made
            )  # fmt: skip
        student.train(was)
        return ids


def _batch_rng(ids: torch.Tensor, seed: int) -> torch.Generator:
    """A generator seeded by the run's seed and the batch's tokens."""
    digest = hashlib.blake2b(ids.detach().cpu().numpy().tobytes(), digest_size=7,
                             key=str(seed).encode()).digest()  # fmt: skip
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def gkd(
    teacher: Any,
    student: nn.Module,
    data: torch.Tensor,
    cfg: GKDConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    run: Run | None = None,
    evaluate: Any = None,
) -> DistillResult:
    """On-policy distillation of `student` on (N, T) token blocks: the first `prompt_fraction` of
    each block is the prompt; the rest is the text's continuation, or (for a share `on_policy` of
    the micro-batches, drawn from the seed and the batch's tokens, so that a resumed run draws as
    the uninterrupted one) the student's own sample; the teacher's top-k on the whole sequence is
    the target of the output tokens.

    Args:
        teacher: a SCORES handle with `top_logprobs` (asked once per micro-batch, on the
            sequences the student is trained on, so a cache cannot serve it).
        student: a causal LM of the teacher's vocabulary, trained in place.
        data: (N, T) token blocks.
        cfg: k, λ (`on_policy`), β, the sampling temperature, the prompt share.
    """
    _same_vocab(teacher, student)
    train_cfg = train_cfg or TrainConfig()
    start = max(1, int(data.shape[1] * cfg.prompt_fraction))
    counts = {"on_policy": 0, "batches": 0}

    def loss_fn(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        ids = batch[0]
        rng = _batch_rng(ids, train_cfg.seed)  # from the batch, so a resumed run draws the same
        draw = torch.rand((), generator=rng)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=rng))
        counts["batches"] += 1
        if float(draw) < cfg.on_policy:
            ids = student_samples(model, ids[:, :start], ids.shape[1] - start,
                                  cfg.temperature, seed)  # fmt: skip
            counts["on_policy"] += 1
        top = teacher_topk(teacher, ids, cfg.k)
        loss = gkd_loss(model(input_ids=ids).logits, top, start, cfg.beta)
        return {"loss": loss, "jsd": loss.detach()}

    batches = shuffled_batches(data, batch_size=cfg.batch_size, seed=train_cfg.seed)
    hist = train(student, loss_fn, batches, train_cfg, run, evaluate)
    return DistillResult(student.eval(), hist, dict(counts))


gkd = register(
    "distill", "gkd", shape=DISTILLER, branch="with data", access=Access.SCORES, config=GKDConfig,
    paper="Agarwal et al. 2024 (GKD), arXiv 2306.13649",
    example=_examples(GKDConfig(k=5, batch_size=4)), cli="lfm distill lm --method gkd",
)(gkd)  # fmt: skip
