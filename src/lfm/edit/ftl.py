"""FT-L: constrained fine-tuning of one MLP layer (Zhu et al. 2020, arXiv 2012.00363).

Fine-tune the weight W of one MLP output projection on the edit's target NLL, keeping it in an
L∞ ball around the original: after every step ‖W − W₀‖_∞ ≤ ε. The baseline of the ROME paper
(arXiv 2202.05262, "FT+L"): Adam, 25 steps, lr 5e-4, ε = 5e-4, the bare prompt only. The model is
run through `torch.func.functional_call` with W₀ + Δ, so it is never changed; Δ is the patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from lfm.access import Access, narrow
from lfm.config import Config
from lfm.core.hooks import frozen
from lfm.edit import common, locate, progress
from lfm.edit.contract import EDITOR
from lfm.edit.patch import Delta, Patch, make_patch
from lfm.edit.requests import Request, build_batch
from lfm.edit.site import EditSite, edit_site
from lfm.registry import Example, register


class FTLConfig(Config):
    # tuned block; None = architecture default (as ROME); negative counts from the top (−1: last)
    layer: int | None = None
    steps: int = Field(25, ge=1)  # Adam steps (ROME paper's FT-L baseline: 25)
    lr: float = Field(5e-4, gt=0)  # Adam learning rate (paper: 5e-4)
    norm_constraint: float = Field(5e-4, gt=0)  # ε in ‖W − W₀‖_∞ ≤ ε (paper: 5e-4)
    stop_nll: float = Field(0.01, ge=0)  # stop early once the mean target NLL is below this


def ftl_delta(
    model: nn.Module, tok: Any, reqs: Sequence[Request], cfg: FTLConfig, site: EditSite
) -> Delta:
    """Dense ΔW (out, in) of the tuned projection at `site` (the model is not changed)."""
    w0 = site.projection(model).weight.detach()  # as stored: (in, out) for GPT-2's Conv1D
    batches = [build_batch(tok, r, [""]) for r in reqs]
    delta = torch.zeros_like(w0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    for _ in range(cfg.steps):
        params = {f"{site.module}.weight": w0 + delta}
        loss = torch.stack([_nll(model, params, b) for b in batches]).mean()
        if loss.item() < cfg.stop_nll:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
    d = delta.detach()
    return Delta(site.module, dense=d.T.contiguous() if site.conv1d else d)


def _nll(model: nn.Module, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    inputs = locate._inputs(model, batch)
    logits = functional_call(model, params, args=(), kwargs=inputs, strict=False).logits
    logp = logits[0].float().log_softmax(-1)
    pos, ids = torch.tensor(batch.target_pos[0]), torch.tensor(batch.target_ids[0])
    return -logp[pos, ids].mean()


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """One request on a tiny Llama, five constrained steps."""
    lm = common.smoke_model("llama", seed)
    return Example(
        (narrow(lm, level), common.SMOKE_REQUEST), {}, FTLConfig(steps=5),
        lambda patch: patch.deltas[0].matrix(),
    )  # fmt: skip


# pragma: no mutate end


def ft_l(handle: Any, requests: Request | Sequence[Request], cfg: FTLConfig | None = None) -> Patch:
    """An FT-L patch: constrained fine-tuning of one MLP projection on all requests together.

    Args:
        handle: a `LocalModel` (WEIGHTS access: the model and its tokenizer).
        requests: the edits.
        cfg: the configuration (the ROME paper's FT-L baseline).
    """
    model, tok = common.model_and_tokenizer(handle, "edit/ft_l")
    cfg, reqs = cfg or FTLConfig(), common.as_requests(requests)
    site = edit_site(model, cfg.layer)
    progress.together(reqs, f"tuned together ({cfg.steps} steps)")
    with frozen(model):
        delta = ftl_delta(model, tok, reqs, cfg, site)
    return make_patch(model, [delta], reqs, "ft_l", cfg)


ft_l = register(
    "edit", "ft_l", shape=EDITOR, branch="constrained tuning", access=Access.WEIGHTS,
    config=FTLConfig, paper="Zhu et al. 2020, arXiv 2012.00363 (FT-L, as the ROME paper's baseline)",
    example=_example, cli="lfm edit apply -m ft_l",
)(ft_l)  # fmt: skip
