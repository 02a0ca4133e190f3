"""Distillation across tokenizers: ULD (Boizard et al. 2024, arXiv 2402.12030) with exact KL on
the shared vocabulary (as GOLD in TRL pairs the two).

Teacher and student read the same text through different tokenizers, so their positions are
paired by text offsets: a character position b is a *common boundary* when a token of each closes
there (the tokens up to it cover `text[:b]` exactly). There the teacher's next-token distribution
q (from its last token ending at b) and the student's p both predict the text that starts at b.
At each such pair, with p = softmax(z_s/T) over V_s and q = softmax(z_t/T) over V_t:

    ULD(p, q) = Σ_i |p_(i) − q_(i)|      p_(i), q_(i) sorted descending, the shorter padded with 0
    KL_∩      = T² · KL(q̃ ‖ p̃)           q̃, p̃ renormalised over the shared vocabulary ∩
    L = α_lm · CE_s + α_uld · mean ULD + α_∩ · mean KL_∩

ULD is the closed-form Wasserstein-1 distance under the paper's assumption (uniform cost between
any two tokens); it compares the distributions' shapes only, so it is zero when one is a
permutation of the other: it cannot tell which token the teacher favours. KL_∩ carries that, on
the tokens whose strings are identical in both vocabularies (GOLD's matched tokens; GOLD takes
ULD over the unmatched ones only, here ULD sees the whole distributions as in the ULD paper).
CE_s is the student's causal LM loss on its own tokens. Defaults follow ULD's code and paper:
α_lm = 1, α_uld = 1.5, T = 1 for both models; α_∩ = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lfm.access import Access, LocalModel, access_of, module_of, narrow
from lfm.config import Config
from lfm.core.hooks import frozen
from lfm.core.tiny import CORPUS, tiny_lm
from lfm.core.train import TrainConfig, shuffled_batches, train
from lfm.distill.contract import DISTILLER, DistillResult
from lfm.distill.lm import student_from_teacher, token_blocks
from lfm.distill.losses import KDConfig, kd_loss
from lfm.errors import ConfigError
from lfm.registry import Example, register
from lfm.runs import Run

IGNORE = -100  # label of padding positions in the student's LM loss


class ULDConfig(Config):
    temperature: float = Field(1.0, gt=0)  # T on both sides (ULD: 1 for student and teacher)
    uld_weight: float = Field(1.5, ge=0)  # α_uld, sorted-probability distance (ULD: λ = 1.5)
    shared_kl_weight: float = Field(1.0, ge=0)  # α_∩, KL on the shared vocabulary; 0: ULD only
    lm_weight: float = Field(1.0, ge=0)  # α_lm, the student's LM loss (ULD: cross-entropy × 1)
    top_k: int = Field(0, ge=0)  # ULD sorts the k largest only (`uld_distance`); 0: all, exact
    batch_size: int = Field(4, ge=1)  # texts per micro-batch


# --------------------------------------------------------------------------------------------
# Alignment by text offsets (pure functions).


def boundaries(offsets: Sequence[tuple[int, int]], length: int) -> dict[int, int]:
    """Text position b → index of the token that closes at b: it ends at b and the next token
    starts exactly at b (the last one closes only at `length`), so the tokens up to it cover
    `text[:b]`. Tokens covering no text (specials such as BOS) close nothing; a token that ends
    inside a character another token finishes (a byte-level split) closes nothing either.

    Args:
        offsets: (start, end) character offsets of each token (`return_offsets_mapping=True`).
        length: the text's length in characters.
    """
    spans = [(k, s, e) for k, (s, e) in enumerate(offsets) if e > s]
    out = {}
    for n, (k, _, end) in enumerate(spans):
        nxt = spans[n + 1][1] if n + 1 < len(spans) else length
        if nxt == end:
            out[end] = k
    return out


def decoded_boundaries(ids: Sequence[int], decode: Callable[[list[int]], str], text: str) -> dict:
    """`boundaries` from token ids alone (a SCORES handle gives no offsets): b → k when the
    first k + 1 tokens decode to exactly `text[:b]`."""
    out = {}
    for k in range(len(ids)):
        prefix = decode(list(ids[: k + 1]))
        if prefix and text.startswith(prefix):
            out[len(prefix)] = k
    return out


def align(teacher: Mapping[int, int], student: Mapping[int, int]) -> list[tuple[int, int, int]]:
    """(b, teacher token, student token) for each common boundary b, in text order."""
    return [(b, teacher[b], student[b]) for b in sorted(teacher.keys() & student.keys())]


# --------------------------------------------------------------------------------------------
# Losses (logits in, loss out).


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()  # (P, V)


def uld_distance(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """Mean over rows of Σ_i |p_(i) − q_(i)|, both sorted descending, the shorter zero-padded.

    Args:
        student: student logits (..., V_s).
        teacher: teacher logits or log-probabilities (..., V_t), any V_t.
        temperature: T, applied to both.
        top_k: 0 is exact. k > 0 sorts only the k largest probabilities of each side (sorting a
            262k vocabulary dominates a step on a CPU) and counts the rest as the difference of
            the two tail masses, which underestimates their distance by at most twice the smaller
            tail mass.
    """
    p = F.softmax(_rows(student) / temperature, -1)
    q = F.softmax(_rows(teacher).detach() / temperature, -1)
    k = min(p.shape[-1], q.shape[-1])
    if top_k and top_k < k:
        k = top_k
    p_top, q_top = p.topk(k, dim=-1).values, q.topk(k, dim=-1).values
    # past rank k: exact when one side's tail is all zero padding (k = the smaller vocabulary)
    tail = ((p.sum(-1) - p_top.sum(-1)) - (q.sum(-1) - q_top.sum(-1))).abs()
    return ((p_top - q_top).abs().sum(-1) + tail).mean()


def shared_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """`T² · KL(q̃ ‖ p̃)` over the shared tokens, each side renormalised over them.

    Args:
        student, teacher: logits (..., V_s) and (..., V_t).
        shared: (teacher ids, student ids) of the tokens both vocabularies spell the same.
    """
    t_ids, s_ids = shared
    return kd_loss(
        _rows(student)[:, s_ids], _rows(teacher)[:, t_ids], KDConfig(temperature=temperature)
    )


def token_strings(model: Any) -> list[str]:
    """The text each token id stands for (`model.decode([i])`, "" for special tokens)."""
    return [model.decode([i]) for i in range(int(model.vocab_size))]


def shared_vocab(
    teacher: Sequence[str], student: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ids, student ids) of the tokens whose strings are identical in both vocabularies.

    Empty strings (special tokens) and strings holding U+FFFD (a byte-level token that is part of
    a character) are left out; a string spelt by several ids maps through its lowest id.
    """

    def first_ids(strings: Sequence[str]) -> dict[str, int]:
        ids: dict[str, int] = {}
        for i, s in enumerate(strings):
            if s and "\ufffd" not in s:
                ids.setdefault(s, i)
        return ids

    t, s = first_ids(teacher), first_ids(student)
    common = [w for w in s if w in t]
    return torch.tensor([t[w] for w in common], dtype=torch.long), torch.tensor(
        [s[w] for w in common], dtype=torch.long
    )


def masked_lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each real token given those before it; logits (B, L, V), ids and mask (B, L)."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE
    )


def xtok_loss(
    s_rows: torch.Tensor,
    t_rows: torch.Tensor,
    lm: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor],
    cfg: ULDConfig,
) -> dict[str, torch.Tensor]:
    """`{"loss", "lm", "uld", "kl"}` from the aligned rows (P, V_s), (P, V_t) and the LM loss."""
    parts = {"lm": lm}
    if cfg.uld_weight:
        parts["uld"] = uld_distance(s_rows, t_rows, cfg.temperature, cfg.top_k)
    if cfg.shared_kl_weight and len(shared[0]):
        parts["kl"] = shared_kl(s_rows, t_rows, shared, cfg.temperature)
    weights = {"lm": cfg.lm_weight, "uld": cfg.uld_weight, "kl": cfg.shared_kl_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return {"loss": total, **{k: v.detach() for k, v in parts.items()}}


# --------------------------------------------------------------------------------------------
# Data: both tokenisations of each text and the aligned positions, as tensors.


def _encode(
    tokenizer: Any, text: str, special: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (with the tokenizer's own special tokens unless `special` is False) and their
    character offsets."""
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
    except NotImplementedError:
        raise ConfigError(
            f"{type(tokenizer).__name__} gives no character offsets; load the model with a fast "
            "(Rust) tokenizer to align it with another vocabulary"
        ) from None
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def _white_box(teacher: Any) -> bool:
    """A teacher in memory is run once per batch; a narrower handle is asked per boundary."""
    return access_of(teacher) >= Access.WEIGHTS


def _tokenizer(handle: Any, role: str) -> Any:
    tok = getattr(handle, "tokenizer", None)
    if tok is None:
        raise ConfigError(
            f"the {role} needs its tokenizer: give it as a LocalModel (model and tokenizer), "
            f"not a bare {type(handle).__name__}"
        )
    return tok


def _teacher_tokens(teacher: Any, text: str) -> tuple[list[int], dict[int, int]]:
    """The teacher's ids (a SCORES handle: none, it is asked by text) and boundaries."""
    if _white_box(teacher):
        ids, offsets = _encode(_tokenizer(teacher, "teacher"), text)
        return ids, boundaries(offsets, len(text))
    return [], decoded_boundaries(teacher.encode(text), teacher.decode, text)


def _pad(rows: Sequence[Sequence[Any]], value: Any, tail: tuple[int, ...] = ()) -> torch.Tensor:
    width = max(1, *(len(r) for r in rows))
    out = torch.full((len(rows), width, *tail), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def encode_texts(teacher: Any, student: LocalModel, texts: Sequence[str]) -> tuple:
    """Per text: the student's ids and mask (N, L_s), the teacher's ids and mask (N, L_t; (N, 1)
    unused for a SCORES handle), the aligned (b, teacher token, student token) triples (N, P, 3),
    padded with −1, and the text's index (N,)."""
    s_tok = _tokenizer(student, "student")
    s_ids, t_ids, pairs = [], [], []
    for text in texts:
        ids, offsets = _encode(s_tok, text)
        t, t_bounds = _teacher_tokens(teacher, text)
        s_ids.append(ids)
        t_ids.append(t)
        pairs.append(align(t_bounds, boundaries(offsets, len(text))))
    t_pad = int(getattr(getattr(teacher, "tokenizer", None), "pad_token_id", None) or 0)
    s_mask, t_mask = _pad([[1] * len(r) for r in s_ids], 0), _pad([[1] * len(r) for r in t_ids], 0)
    return (
        _pad(s_ids, int(s_tok.pad_token_id or 0)), s_mask, _pad(t_ids, t_pad), t_mask,
        _pad(pairs, -1, (3,)), torch.arange(len(texts)),
    )  # fmt: skip


def text_blocks(
    tokenizer: Any, texts: Sequence[str], block_size: int, max_blocks: int = 0
) -> list[str]:
    """Texts cut into pieces of about `block_size` tokens of `tokenizer`, each cut at a boundary
    where a token closes (a piece re-tokenised alone may differ by a token or two); the shorter
    remainder of each text is dropped.

    Args:
        tokenizer: a fast tokenizer (the student's: blocks are counted in its tokens).
        texts: the documents, in order.
        block_size: tokens per piece.
        max_blocks: stop once this many pieces exist (0: no limit).
    """
    out: list[str] = []
    for text in texts:
        _, offsets = _encode(tokenizer, text, special=False)
        start, last = 0, -1  # text position and token index where the current piece starts
        for b, k in sorted(boundaries(offsets, len(text)).items()):
            if k - last >= block_size:
                out.append(text[start:b])
                start, last = b, k
                if max_blocks and len(out) >= max_blocks:
                    return out
    return out


def held_out_blocks(tokenizer: Any, texts: Sequence[str], size: int, n: int) -> torch.Tensor:
    """(n, size) held-out token blocks, each led by the tokenizer's BOS when its encodings start
    with one (as the training pieces are): Gemma 3 scores text far worse without its BOS. SmolLM2's
    tokenizer adds none, so its blocks are `token_blocks`' as they are."""
    blocks = token_blocks(tokenizer, texts, size, n)
    empty = tokenizer("")["input_ids"]  # [BOS], or [BOS, EOS] from a tokenizer that appends EOS
    bos = getattr(tokenizer, "bos_token_id", None)
    if not empty or bos is None or empty[0] != bos:
        return blocks
    return torch.cat([torch.full((len(blocks), 1), bos, dtype=blocks.dtype), blocks], 1)


def layer_dropped(model: LocalModel, every: int = 3, offset: int = 0) -> LocalModel:
    """A student of `model`'s family: its layer-dropped copy (`student_from_teacher`: every k-th
    block, embeddings, norm and head copied) beside the same tokenizer."""
    student = student_from_teacher(module_of(model), every, offset)
    return LocalModel(student, _tokenizer(model, "student"), name=f"{model.name}-every{every}")


# --------------------------------------------------------------------------------------------
# The distiller.


def teacher_rows(teacher: Any, texts: Sequence[str], batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The teacher's logits (or log-probabilities) at the batch's aligned pairs, (P, V_t), in the
    order of `pairs[..., 0] >= 0`'s nonzero entries. A teacher in memory reads its own tokens in
    one pass; a SCORES handle is asked for its next token after each `text[:b]`."""
    _, _, t_ids, t_mask, pairs, index = batch
    rows, cols = (pairs[..., 0] >= 0).nonzero(as_tuple=True)
    with torch.no_grad():
        if _white_box(teacher):
            model = module_of(teacher)
            at = next(model.parameters()).device
            logits = model(input_ids=t_ids.to(at), attention_mask=t_mask.to(at)).logits
            return logits[rows.to(at), pairs[rows, cols, 1].to(at)].to(t_ids.device)
        prompts = [
            texts[int(index[r])][: int(pairs[r, c, 0])] for r, c in zip(rows, cols, strict=True)
        ]
        # one prompt a call: batching would pad them, and padding moves a model's positions
        out = [teacher.next_token_logprobs([p]) for p in prompts]
        return torch.cat(out).to(t_ids.device) if out else torch.zeros(0, int(teacher.vocab_size))


def make_loss_fn(teacher: Any, texts: Sequence[str], shared: tuple, cfg: ULDConfig):
    """`loss_fn(student, batch)` for the shared loop over `encode_texts` batches."""

    def loss_fn(student: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        s_ids, s_mask, _, _, pairs, _ = batch
        logits = student(input_ids=s_ids, attention_mask=s_mask).logits  # (B, L_s, V_s)
        lm = masked_lm_loss(logits, s_ids, s_mask)
        rows, cols = (pairs[..., 0] >= 0).nonzero(as_tuple=True)
        if not len(rows) or not (cfg.uld_weight or cfg.shared_kl_weight):
            return {"loss": cfg.lm_weight * lm, "lm": lm.detach()}
        s_rows = logits[rows, pairs[rows, cols, 2]]  # (P, V_s)
        on = s_rows.device
        return xtok_loss(
            s_rows, teacher_rows(teacher, texts, batch), lm, tuple(x.to(on) for x in shared), cfg
        )

    return loss_fn


def check_vocabularies(teacher: Any, student: LocalModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared vocabulary (`shared_vocab`); a `ConfigError` when both have one vocabulary."""
    t, s = token_strings(teacher), token_strings(student)
    if t == s:
        raise ConfigError(
            "teacher and student have the same vocabulary: distil with lm_student (`lfm distill "
            "lm`), which compares the two distributions token for token"
        )
    return shared_vocab(t, s)


# A corpus for the example's student tokenizer, unlike the teacher's (`CORPUS`): other merges.
STUDENT_CORPUS = (
    "the eiffel tower stands in paris; rome and madrid are capitals too.",
    "a large model teaches a small one through what it lets us see.",
    "kyoto is old, tokyo is large, and both are cities of japan.",
)


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _summary(result: DistillResult) -> dict[str, Any]:
    return {"losses": torch.tensor(result.history.losses), **result.info}


def _example(level: Access, seed: int) -> Example:
    """Three steps from a tiny Gemma 3 teacher into a tiny Llama with another BPE vocabulary."""
    teacher = narrow(LocalModel(*tiny_lm("gemma3", seed), name="teacher"), level)
    s_model, s_tok = tiny_lm("llama", seed + 1, corpus=STUDENT_CORPUS, vocab_size=300)
    kw = {"train_cfg": TrainConfig(steps=3, lr=1e-2, seed=seed, progress=False)}
    data = [" ".join(text.split()[:4]) for text in CORPUS[:4]]  # short: SCORES is asked per b
    return Example((teacher, LocalModel(s_model, s_tok, "student"), data), kw, ULDConfig(batch_size=2),
                   summary=_summary)  # fmt: skip


# pragma: no mutate end


def uld(
    teacher: Any,
    student: LocalModel,
    data: Sequence[str],
    cfg: ULDConfig | None = None,
    *,
    train_cfg: TrainConfig | None = None,
    run: Run | None = None,
    evaluate: Any = None,
) -> DistillResult:
    """Train `student` in place on `data` from a teacher with another tokenizer.

    Args:
        teacher: a handle with SCORES access (asked `next_token_logprobs(text[:b])` at each
            aligned boundary b, one call each), or a `LocalModel`, which reads each text in one
            forward pass over its own tokens (same rows); frozen in eval mode while training.
        student: a `LocalModel` (module and fast tokenizer) trained in place, e.g. `layer_dropped`.
        data: the training texts (`text_blocks` cuts documents into pieces).
        cfg: loss weights, temperature and batch size (resolved by the registry).
        train_cfg: the shared loop's steps, learning rate and seed (None: `TrainConfig()`).
        run: a run directory for metrics and checkpoints.
        evaluate: `evaluate(student module) -> {name: value}` at the loop's evaluation steps.

    Returns:
        the student's module (eval mode), the loop's `History`, and in `info` the counts of
        `aligned` positions, student `tokens` and `shared` vocabulary entries.

    Raises:
        ConfigError: both have one vocabulary (use `lm_student`), no boundary aligns, a
            tokenizer gives no offsets, or a model comes without its tokenizer.
    """
    train_cfg = train_cfg or TrainConfig()
    texts = [str(t) for t in data]
    _tokenizer(student, "student")
    if _white_box(teacher):
        _tokenizer(teacher, "teacher")
    shared = check_vocabularies(teacher, student)
    tensors = encode_texts(teacher, student, texts)
    aligned = int((tensors[4][..., 0] >= 0).sum())
    if not aligned:
        raise ConfigError(
            f"no position of the {len(texts)} texts aligns: no character position closes a token "
            "of both tokenizers; give longer texts"
        )
    batches = shuffled_batches(*tensors, batch_size=min(cfg.batch_size, len(texts)),
                               seed=train_cfg.seed)  # fmt: skip
    loss_fn = make_loss_fn(teacher, texts, shared, cfg)
    held = frozen(module_of(teacher), train=False) if _white_box(teacher) else nullcontext()
    with held:
        hist = train(student.model, loss_fn, batches, train_cfg, run, evaluate)
    info = {"aligned": aligned, "tokens": int(tensors[1].sum()), "shared": len(shared[0])}
    return DistillResult(student.model.eval(), hist, info)


uld = register(
    "distill", "uld", shape=DISTILLER, branch="with data", access=Access.SCORES, config=ULDConfig,
    paper="Boizard et al. 2024 (ULD), arXiv 2402.12030", example=_example,
    cli="lfm distill lm --method uld",
)(uld)  # fmt: skip
