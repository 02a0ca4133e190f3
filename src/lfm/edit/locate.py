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
from typing import Any

import torch
from torch import nn

from lfm.core.hooks import add_at, capture, stop_after
from lfm.edit import tail
from lfm.edit.requests import Batch, Request, build_batch
from lfm.edit.site import EditSite
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


@torch.no_grad()
def read_at_subject(
    model: nn.Module, batch: Batch, outputs: Sequence[str], inputs: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What the named modules produce (`outputs`) and take (`inputs`, first positional input) at
    each row's subject position, (B, D) float on the CPU each, from one forward pass that stops
    once every module in `outputs` has run (the blocks above them are skipped)."""
    rows = torch.arange(len(batch.subject_pos))
    # the capturing hooks are registered first, so they run before the one that stops the pass
    with (
        capture(model, list(inputs), inputs=True) as ins,
        capture(model, list(outputs)) as outs,
        stop_after(model, list(outputs)) as run,
    ):
        run(lambda: model(**_inputs(model, batch), logits_to_keep=1))
    missing = [n for n in outputs if n not in outs] + [n for n in inputs if n not in ins]
    if missing:
        raise LfmError(f"{', '.join(missing)} did not run in the forward pass")

    def at_subject(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t[rows, batch.subject_pos].float().cpu() for n, t in acts.items()}

    return at_subject(ins), at_subject(outs)


def keys_and_outputs(
    model: nn.Module, tokenizer: Any, req: Request, site: EditSite, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prefix keys (P, D_in) and MLP outputs (P, D_out) at the subject's last token."""
    batch = build_batch(tokenizer, req, prefixes(n), with_target=False)
    keys, outs = read_at_subject(model, batch, [site.module], [site.module])
    return keys[site.module], outs[site.module]


def _inputs(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    dev = next(model.parameters()).device
    return {"input_ids": batch.input_ids.to(dev), "attention_mask": batch.attention_mask.to(dev)}


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
    model: nn.Module, tokenizer: Any, req: Request, site: EditSite, cfg: Any, outs: Any = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """δ for the MLP output at `site` at the subject's last token (see module docstring).

    `cfg` provides: n_prefixes, v_steps, v_lr, v_weight_decay, kl_factor, clamp_norm,
    stop_nll and optionally tail_only (default True: `lfm.edit.tail`'s split forward, the same
    loss up to rounding). `outs`: the per-prefix MLP outputs from `keys_and_outputs`, if the
    caller has them. Returns δ (D_out,) and a small trace (initial and final NLL, steps taken).
    """
    if cfg.v_lr is None or cfg.stop_nll is None:  # the defaults depend on the method and model
        raise LfmError("v_lr and stop_nll are unset: fill them with common.search_defaults")
    mod = site.projection(model)
    batch = build_batch(tokenizer, req, prefixes(cfg.n_prefixes))
    kl_batch = build_batch(tokenizer, essence_request(req), [""], with_target=False)
    if outs is None:
        outs = keys_and_outputs(model, tokenizer, req, site, cfg.n_prefixes)[1]
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
        with add_at(mod, rows, batch.subject_pos, delta):
            nll = _target_nll(model, batch)
        with add_at(mod, torch.zeros(1, dtype=torch.long), kl_batch.subject_pos, delta):
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
        with add_at(mod, rows, first, delta):
            nll = _nll_from(nll_tail, lambda keep: tail.forward(model, nll_tail, keep))
        with add_at(mod, first[:1], first[:1], delta):
            logp = tail.forward(model, kl_tail, 0)[:, last].float().log_softmax(-1)
        return nll, _kl(logp, kl_ref)

    return losses


@torch.no_grad()
def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    norm = delta.norm()
    if norm > max_norm:
        delta.mul_(max_norm / norm)
