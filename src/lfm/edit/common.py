"""Shared plumbing of the editing methods: handles, the δ search's defaults, statistics, tiny models.

Nothing here does the maths of a method; it unpacks what a method is given (a `LocalModel`: the
model with its tokenizer), fills the architecture-dependent defaults, finds the key statistics C,
and lets a method apply its own intermediate deltas *temporarily* (restored bit for bit on exit),
so computing a patch never leaves the caller's model changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lfm.access import LocalModel, module_of
from lfm.core.tiny import tiny_lm
from lfm.edit.base import edits
from lfm.edit.patch import Delta, Undo, linear_weight
from lfm.edit.requests import Request
from lfm.edit.site import EditSite
from lfm.errors import LfmError


def model_and_tokenizer(handle: Any, what: str) -> tuple[nn.Module, Any]:
    """The causal LM and its tokenizer behind a white-box handle (a `LocalModel`)."""
    model = module_of(handle, what)
    tok = getattr(handle, "tokenizer", None)
    if tok is None:
        raise LfmError(
            f"{what} needs a LocalModel (a model with its tokenizer), not a {type(handle).__name__}"
        )
    return model, tok


def as_requests(requests: Request | Sequence[Request] | dict | Sequence[dict]) -> list[Request]:
    """A list of validated requests from one request, dicts or a list of them."""
    items = [requests] if isinstance(requests, Request | dict) else list(requests)
    if not items:
        raise LfmError("no edit requests given")
    return [r if isinstance(r, Request) else Request.from_dict(r) for r in items]


# The δ search on layouts that norm the MLP output before the residual (Gemma 3). There the MLP
# output's scale is free (the norm undoes it) and small (‖v‖ 4–14 at the subject in Gemma 3 270M,
# against 30–50 in SmolLM2), so the paper's absolute Adam step of 0.5 overshoots; and δ searched to
# P(target) ≈ 0.95 spills onto other subjects of the same kind. Measured in docs/edit.md.
NORMED_V_LR = 0.05
PAPER_V_LR, PAPER_STOP_NLL = 0.5, 0.05


def search_defaults(cfg: Any, site: EditSite, normed_stop_nll: float = PAPER_STOP_NLL) -> Any:
    """`cfg` with the δ search's `v_lr` and `stop_nll` filled where they are None: the paper's
    0.5 and 0.05, or, where the layout norms the MLP output (Gemma 3), `NORMED_V_LR` and
    `normed_stop_nll`. Each method calls it once, at its entry point."""
    lr = cfg.v_lr if cfg.v_lr is not None else (NORMED_V_LR if site.normed else PAPER_V_LR)
    stop = cfg.stop_nll
    if stop is None:
        stop = normed_stop_nll if site.normed else PAPER_STOP_NLL
    return cfg.replace(v_lr=lr, stop_nll=stop)


def covariance(
    model: nn.Module, tokenizer: Any, site: EditSite, cfg: Any, given: Any
) -> torch.Tensor:
    """C at the site's layer: the one given (tensor or {layer: tensor}), identity if the config
    turns covariance off, else the cached statistics (computed once)."""
    if isinstance(given, dict):
        given = given.get(site.layer)
    if given is not None:
        return given.double().cpu()  # the solves run on the CPU, beside the keys and δ
    if not cfg.use_cov:
        return torch.eye(site.d_in, dtype=torch.float64)
    from lfm.edit.stats import second_moment

    return second_moment(model, tokenizer, site.layer, *stats_args(cfg, [site])).double().cpu()


def stats_args(cfg: Any, sites: Sequence[EditSite]) -> tuple[str, int, int]:
    """The statistics' corpus, token budget and article cap, once the budget is known to reach
    the key width D_in: C = E[kkᵀ] over fewer tokens has rank below D_in, and the solve would
    lean on the ridge alone in the directions no token reached."""
    d_in = max(s.d_in for s in sites)
    if cfg.stats_tokens < d_in:
        raise LfmError(
            f"stats_tokens={cfg.stats_tokens} is too small: C = E[kkᵀ] at this model's edited "
            f"projection needs at least D_in = {d_in} tokens (the paper reads 100,000)"
        )
    return cfg.stats_corpus, cfg.stats_tokens, cfg.stats_max_len


def prefetch_covariances(
    model: nn.Module, tokenizer: Any, sites: Sequence[EditSite], cfg: Any, given: Any
) -> Any:
    """{layer: C}: the given statistics, else all cached/computed in one pass (if C is used)."""
    if given is not None or not cfg.use_cov:
        return given
    from lfm.edit.stats import second_moments

    return second_moments(model, tokenizer, [s.layer for s in sites], *stats_args(cfg, sites))


def solve_cov(cov: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge·tr(C)/D·I)⁻¹ rhs in float64; the tiny ridge only guards a rank-deficient C."""
    return torch.linalg.solve(add_ridge(cov.clone(), ridge), rhs.to(cov.device).double())


def add_ridge(m: torch.Tensor, ridge: float) -> torch.Tensor:
    """`m` + ridge·tr(m)/D·I, in place (a relative ridge on a square matrix); returns `m`."""
    m.diagonal().add_(ridge * m.diagonal().mean())
    return m


@contextmanager
def temporarily(model: nn.Module, deltas: Sequence[Delta]) -> Iterator[None]:
    """Apply deltas for the duration of the block; restore the exact originals after."""
    names = {d.module for d in deltas}
    undo = Undo({m: model.get_submodule(m).weight.detach().clone() for m in names})
    try:
        with torch.no_grad(), edits(model):
            for d in deltas:
                w = linear_weight(model, d.module)
                w.add_(d.matrix().to(w.device, w.dtype))
        yield
    finally:
        undo.revert(model)


# ---- the tiny problem of the registry's examples (the tests use it too) ----

# pragma: no mutate start (test data: the registry's examples and the tests build on it)
SMOKE_TEXTS = (
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Tokyo is a large city in Japan; Kyoto is an old city.",
)


def smoke_model(kind: str = "llama", seed: int = 0) -> LocalModel:
    """A 2-block, 32-wide causal LM (`lfm.core.tiny.tiny_lm`) whose tokenizer is trained on
    `SMOKE_TEXTS` with room for 2,000 tokens, so that every word with its leading space is one
    token."""
    return LocalModel(*tiny_lm(kind, seed, corpus=SMOKE_TEXTS, vocab_size=2000))


# The subject ends the prompt: in a random 2-block model only the residual at the subject's own
# position reaches the next-token logits strongly (attention there is near uniform and small).
SMOKE_REQUEST = Request("The city of the Eiffel Tower", "Eiffel Tower", "Rome")


def smoke_cov(model: nn.Module, tokenizer: Any, layer: int) -> torch.Tensor:
    """C at `layer` from `SMOKE_TEXTS` (no corpus, no cache)."""
    from lfm.edit.stats import compute_second_moments

    return compute_second_moments(model, tokenizer, [layer], SMOKE_TEXTS * 8, 10_000, 64)[layer]


# pragma: no mutate end
