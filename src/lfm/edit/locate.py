"""Keys and values for locate-and-edit methods (ROME arXiv 2202.05262, MEMIT arXiv 2210.07229).

One implementation shared by ROME, MEMIT and AlphaEdit:

  k* = mean_j k(prefix_j + prompt)   at the subject's last token, input of the MLP output proj.
  δ  = argmin  mean_j NLL(target | prefix_j + prompt; h_L[s] += δ)
             + kl · KL(p(· | "{subject} is a") ‖ p_δ(· | "{subject} is a"))
             + wd · ‖δ‖ / ‖h_L[s]‖²,     with ‖δ‖ ≤ clamp · ‖h_L[s]‖
  v* = W k* + δ                      (the MLP output the edited weight must produce for k*)

The prefixes are a *fixed* list (`PREFIXES`) rather than text the model generates: the key is
then reproducible and model-independent, and the r-ROME fix (Gupta et al. 2024) holds by
construction — the same averaged k* is used for v*, for C⁻¹k* and in the denominator.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from lfm.core.layouts import module_name
from lfm.edit import tail
from lfm.edit.requests import Batch, Request, build_batch
from lfm.errors import LfmError

# Short, neutral contexts; "" is the bare prompt. ROME samples 20 model-written prefixes; a fixed
# list keeps keys deterministic and identical across methods and runs.
PREFIXES: tuple[str, ...] = (
    "",
    "The following is true.",
    "Here is a fact.",
    "I read this in a book.",
    "Note:",
    "As everyone knows,",
    "In other news,",
    "Today we learned that",
    "It is said that",
    "Question answered:",
    "From the encyclopedia:",
)


def prefixes(n: int) -> tuple[str, ...]:
    """The bare prompt plus the first n − 1 fixed prefixes."""
    return PREFIXES[: max(1, min(n, len(PREFIXES)))]


def _mod(model: nn.Module, layer: int) -> nn.Module:
    return model.get_submodule(module_name(model, "mlp_out", layer))


class _Stop(Exception):
    """Raised by a hook once every module read has run: later blocks need not."""


@torch.no_grad()
def read_modules(
    model: nn.Module, batch: Batch, mods: Sequence[nn.Module]
) -> list[tuple[Any, torch.Tensor]]:
    """(first positional input or None, output) of each module at each row's subject position,
    from one forward pass that stops once all have run (the blocks above are skipped)."""
    got: dict[int, tuple[Any, torch.Tensor]] = {}
    rows = torch.arange(len(batch.subject_pos))

    def hook(i: int):
        def fn(_m: nn.Module, args: tuple, out: Any) -> None:
            out = out[0] if isinstance(out, tuple) else out
            inp = args[0][rows, batch.subject_pos].float() if args else None  # blocks: keywords
            got[i] = (inp, out[rows, batch.subject_pos].float())
            if len(got) == len(mods):
                raise _Stop

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(mods)]
    try:
        with suppress(_Stop):
            model(**_inputs(model, batch), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    if len(got) < len(mods):
        raise RuntimeError("a module to read did not run in the forward pass")
    return [(a if a is None else a.cpu(), b.cpu()) for a, b in (got[i] for i in range(len(mods)))]


def keys_and_outputs(
    model: nn.Module, tokenizer: Any, req: Request, layer: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prefix keys (P, D_in) and MLP outputs (P, D_out) at the subject's last token."""
    batch = build_batch(tokenizer, req, prefixes(n), with_target=False)
    return read_modules(model, batch, [_mod(model, layer)])[0]


def _inputs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    dev = next(model.parameters()).device
    return {"input_ids": batch.input_ids.to(dev), "attention_mask": batch.attention_mask.to(dev)}


@contextmanager
def _add_at(mod: nn.Module, rows: torch.Tensor, pos: torch.Tensor, delta: torch.Tensor):
    """Add `delta` to the module's output at (rows, pos) during forward passes."""

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[rows, pos] = out[rows, pos] + delta.to(out.dtype)
        return out

    handle = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _target_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean over rows of the mean NLL of each row's target tokens."""
    return _nll_from(batch, lambda keep: model(**_inputs(model, batch), logits_to_keep=keep).logits)


def _nll_from(batch: Any, logits_at: Any) -> torch.Tensor:
    """The target NLL of `batch` (its `target_pos`, `target_ids`) from `logits_at(positions)`."""
    keep = sorted({p for row in batch.target_pos for p in row})
    col = {p: i for i, p in enumerate(keep)}
    logp = logits_at(torch.tensor(keep)).float().log_softmax(-1)  # (B, K, V)
    losses = []
    for i, (pos, ids) in enumerate(zip(batch.target_pos, batch.target_ids, strict=True)):
        cols = torch.tensor([col[p] for p in pos])
        losses.append(-logp[i, cols, torch.tensor(ids, device=logp.device)].mean())
    return torch.stack(losses).mean()


def _last_logp(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probs of the next token after the last real token of each row. (B, V)"""
    out = model(**_inputs(model, batch)).logits.float().log_softmax(-1)
    last = batch.attention_mask.sum(1) - 1
    return out[torch.arange(out.shape[0]), last.to(out.device)]


def essence_request(req: Request) -> Request:
    """ROME's essence prompt "{subject} is a", for the KL drift term."""
    return Request(f"{req.subject} is a", req.subject, req.target)


def optimise_delta(
    model: nn.Module, tokenizer: Any, req: Request, layer: int, cfg: Any, outs: Any = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """δ for the MLP output of `layer` at the subject's last token (see module docstring).

    `cfg` provides: n_prefixes, v_steps, v_lr, v_weight_decay, kl_factor, clamp_norm,
    stop_nll and optionally tail_only (default True: `lfm.edit.tail`'s split forward, the same
    loss up to rounding). `outs`: the per-prefix MLP outputs from `keys_and_outputs`, if the
    caller has them. Returns δ (D_out,) and a small trace (initial and final NLL, steps taken).
    """
    if cfg.v_lr is None or cfg.stop_nll is None:  # the defaults depend on the method and model
        raise LfmError("v_lr and stop_nll are unset: fill them with common.search_defaults")
    mod = _mod(model, layer)
    batch = build_batch(tokenizer, req, prefixes(cfg.n_prefixes))
    kl_batch = build_batch(tokenizer, essence_request(req), [""], with_target=False)
    if outs is None:
        outs = keys_and_outputs(model, tokenizer, req, layer, cfg.n_prefixes)[1]
    ref = outs.mean(0).norm()
    with torch.no_grad():
        kl_ref = _last_logp(model, kl_batch)
    losses = _tail_losses if getattr(cfg, "tail_only", True) else _full_losses
    loss_fn = losses(model, mod, batch, kl_batch, kl_ref)
    delta = torch.zeros(outs.shape[1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    trace: dict[str, float] = {}
    for step in range(cfg.v_steps):
        nll, kl = loss_fn(delta)
        trace.setdefault("nll_start", nll.item())
        trace.update(nll_end=nll.item(), steps=step)
        if nll.item() < cfg.stop_nll:
            break
        loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * delta.norm() / ref**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        _clamp(delta, cfg.clamp_norm * ref)
    return delta.detach(), trace


def _kl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="batchmean")


def _full_losses(model, mod, batch: Batch, kl_batch: Batch, kl_ref):
    """(NLL, KL) as functions of δ, each from a full forward pass (the reference path)."""
    rows = torch.arange(len(batch.subject_pos))

    def losses(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _add_at(mod, rows, batch.subject_pos, delta):
            nll = _target_nll(model, batch)
        with _add_at(mod, torch.zeros(1, dtype=torch.long), kl_batch.subject_pos, delta):
            logp = _last_logp(model, kl_batch)
        return nll, _kl(logp, kl_ref)

    return losses


def _tail_losses(model, mod, batch: Batch, kl_batch: Batch, kl_ref):
    """(NLL, KL) as functions of δ, re-running only the tokens from the subject on (`tail`)."""
    nll_tail, kl_tail = tail.prepare(model, batch), tail.prepare(model, kl_batch)
    rows = torch.arange(len(batch.subject_pos))
    first = torch.zeros(len(rows), dtype=torch.long)  # the subject's last token: tail column 0
    last = int(kl_batch.attention_mask.sum() - kl_batch.subject_pos[0]) - 1

    def losses(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _add_at(mod, rows, first, delta):
            nll = _nll_from(nll_tail, lambda keep: tail.forward(model, nll_tail, keep))
        with _add_at(mod, first[:1], first[:1], delta):
            logp = tail.forward(model, kl_tail, 0)[:, last].float().log_softmax(-1)
        return nll, _kl(logp, kl_ref)

    return losses


@torch.no_grad()
def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    norm = delta.norm()
    if norm > max_norm:
        delta.mul_(max_norm / norm)


def frozen(model: nn.Module) -> Sequence[bool]:
    """Turn off gradients of every parameter; return the old flags (for `restore_grad`)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def restore_grad(model: nn.Module, flags: Sequence[bool]) -> None:
    for p, f in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(f)
