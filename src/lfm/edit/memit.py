"""MEMIT (Meng et al. 2023, arXiv 2210.07229) and AlphaEdit (Fang et al. 2025, arXiv 2410.02355).

MEMIT edits many facts at once, spreading each update over several MLP output projections.
For request i it finds a target residual z_i = h_i + δ_i at the last edited layer L (δ_i as in
ROME, `lfm.edit.locate`). Then, layer by layer (l = l₁ … L, each seeing the earlier updates):

    R  = (z − h_cur) / (number of layers left)          (D_out, n)  residual share
    K  = keys of the n subjects at l (prefix-averaged)    (D_in, n)
    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹                              solved in float64

With `key_constraint="each"` (the default) every prefixed prompt of request i is a column of its
own, weighted 1/√P: k_ij and r_ij = (h_ij + δ_i − h_cur,ij)/(layers left), so the least squares
fits the keys the prompts actually produce (the bare prompt's among them), and R Kᵀ is the
average of r_ij k_ijᵀ over prefixes instead of the product of averages ("mean", the paper's).

λ = `mom2_update_weight` weighs the preserved keys' second moment C (paper, GPT-J: 15,000 for
16,384-wide keys; the default here scales it by D_in / 16,384 so that λ·tr(C)/D_in keeps the
paper's balance against a single key's ‖k‖² on narrower MLPs).

AlphaEdit replaces the λC term by a projection onto the null space of C: with P = Û Ûᵀ, Û the
eigenvectors of C whose eigenvalues are below `null_threshold` (paper: 1e-2),

    ΔW = R [(P (K_p K_pᵀ + K Kᵀ) + α I)⁻¹ P K]ᵀ

so that ΔW k ≈ 0 for the preserved keys k (K_p: keys of earlier sequential edits, carried as
an explicit state by `lfm.edit.sequential`). α is `alpha_l2`·tr(C)/D, relative to this model's
key scale (paper: absolute 10).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access, narrow
from lfm.config import Config
from lfm.core.hooks import frozen
from lfm.core.layouts import get_layout, num_layers
from lfm.edit import common, locate, progress
from lfm.edit.contract import EDITOR
from lfm.edit.patch import Delta, Patch, make_patch
from lfm.edit.requests import Request, build_batch
from lfm.edit.site import EditSite, default_layer, edit_sites, layer_of
from lfm.errors import LfmError
from lfm.registry import Example, register


class MemitConfig(Config):
    # edited blocks, distinct; None or () = default_layer−2 … default_layer+2; negative counts from
    # the top (−1: the last block)
    layers: tuple[int, ...] | None = None
    # bare prompt + fixed prefixes, for keys and the target NLL; at most all of them
    n_prefixes: int = Field(11, ge=1, le=len(locate.PREFIXES))
    # "each": one least-squares column per prefixed prompt (weight 1/√P); "mean": one per request
    key_constraint: Literal["each", "mean"] = "each"
    v_steps: int = Field(20, ge=1)  # Adam steps on each δ_i (paper: 20–25)
    # Adam lr on δ_i; None: the paper's 0.5 (normed MLP output: 0.05)
    v_lr: float | None = Field(None, gt=0)
    v_weight_decay: float = Field(0.5, ge=0)  # weight on ‖δ‖ / ‖v‖² (paper)
    kl_factor: float = Field(0.0625, ge=0)  # essence-drift KL weight (paper)
    clamp_norm: float = Field(0.75, gt=0)  # ‖δ‖ ≤ clamp_norm · ‖h‖ (paper, GPT-J: 0.75 of h)
    # early stop on the target NLL; None: the paper's 0.05
    stop_nll: float | None = Field(None, ge=0)
    tail_only: bool = True  # per step, re-run only the subject's tail (same loss; `lfm.edit.tail`)
    # λ in (λC + KKᵀ); None = 15,000 · D_in / 16,384 (the paper's GPT-J value per key dimension),
    # a third of that where the MLP output is normed (Gemma 3; `memit_defaults`, docs)
    mom2_update_weight: float | None = Field(None, gt=0)
    use_cov: bool = True  # False = C = I (for ablation)
    cov_ridge: float = Field(1e-6, ge=0)  # relative ridge on C (guards a rank-deficient C)
    null_space: bool = False  # AlphaEdit: project the update onto C's null space
    # AlphaEdit: eigenvalues of C below this span the null space
    null_threshold: float = Field(1e-2, gt=0)
    # AlphaEdit: α·tr(C)/D·I in the solve (paper: absolute "L2" = 10)
    alpha_l2: float = Field(1.0, ge=0)
    stats_corpus: str = Field("bbc-news", min_length=1)  # text for C
    # token budget for C; at least the key width D_in, checked when C is computed
    stats_tokens: int = Field(100_000, ge=1)
    stats_max_len: int = Field(256, ge=1)  # tokens read from one article at most


# λ per key dimension: the paper's (GPT-J), and where the layout norms the MLP output (Gemma 3), a
# third of it; chosen on held-out facts (docs/edit.md): with the paper's λ a third of single edits
# on Gemma 3 did not take (efficacy 66.7), with a third of it all did (neighbourhood 96.7 both).
PAPER_LAMBDA, NORMED_LAMBDA = 15_000.0 / 16_384, 5_000.0 / 16_384


def memit_defaults(cfg: MemitConfig, site: EditSite) -> MemitConfig:
    """`cfg` with the δ search's defaults (`common.search_defaults`) and λ filled for the
    architecture of `site` (any edited site: the layout and key width are the model's). Each entry
    point calls it once."""
    cfg = common.search_defaults(cfg, site)
    if cfg.mom2_update_weight is not None:
        return cfg
    per_dim = NORMED_LAMBDA if site.normed else PAPER_LAMBDA
    return cfg.replace(mom2_update_weight=per_dim * site.d_in)


def edit_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """The edited blocks, ascending (MEMIT spreads the change from the lowest block up to the last,
    L, whatever order they are given in; negative ones count from the top). The default is five
    around `default_layer`, or, where the layout norms the MLP output (Gemma 3), the three ending
    at it: there a window reaching above it left most edits undone (docs/edit.md)."""
    if layers:
        blocks = [layer_of(model, layer) for layer in layers]
        if len(set(blocks)) < len(blocks):  # −1 and n−1 name one block: it would be edited twice
            raise LfmError(f"layers {list(layers)} name a block twice (as blocks {blocks})")
        return sorted(blocks)
    mid, n = default_layer(model), num_layers(model)
    top = mid if get_layout(model).mlp_out_norm else mid + 2
    return sorted({min(max(i, 0), n - 1) for i in range(mid - 2, top + 1)})


def resid_and_keys(
    model: nn.Module,
    tok: Any,
    reqs: Sequence[Request],
    last: EditSite,
    site: EditSite,
    n: int,
    each: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each subject's last token: the residual after block `last` (D, ·), and the keys
    (D_in, ·) and outputs (D_out, ·) of `site`'s MLP output projection, from one forward pass per
    request that stops after block `last`. Columns: with `each` one per prefixed prompt, request
    by request (n·P), else one per request, the prefix mean."""
    cols: list[list[torch.Tensor]] = [[], [], []]
    for req in reqs:
        batch = build_batch(tok, req, locate.prefixes(n), with_target=False)
        ins, outs = locate.read_at_subject(model, batch, [last.block, site.module], [site.module])
        for c, t in zip(cols, (outs[last.block], ins[site.module], outs[site.module]), strict=True):
            c.append(t if each else t.mean(0, keepdim=True))
    h, k, m = (torch.cat(c, 0).T for c in cols)
    return h, k, m


def resid_change(norm: nn.Module | None, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The residual change when the MLP outputs m (D, cols) become m + δ: δ itself, or through
    the norm, norm(m + δ) − norm(m)."""
    with torch.no_grad():
        if norm is None:
            return delta[:, None].expand_as(m) if delta.dim() == 1 else delta
        return _apply(norm, m + (delta[:, None] if delta.dim() == 1 else delta)) - _apply(norm, m)


def value_change(norm: nn.Module | None, m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The MLP-output change Δm (D, cols) that moves the residual by r (D, cols): r itself, or,
    through an RMS norm y = g ⊙ x / rms(x), the x closest to m along u = (norm(m) + r) / g. The
    norm's output has a fixed size, so only r's direction is reachable in general; an r that came
    from `resid_change` is reached exactly, also where the gain has zeros (see below)."""
    with torch.no_grad():
        if norm is None:
            return r
        g = _apply(norm, torch.ones(m.shape[0], 1))  # the gain: rms of a column of ones is 1
        live = (
            g.abs() > 1e-6 * g.abs().max()
        )  # Gemma 3 has gains of exactly 0: those outputs stay 0
        u = torch.where(live, (_apply(norm, m) + r) / torch.where(live, g, 1.0), 0.0)
        # dead coordinates only count in rms(x): give them m's direction and the length that makes
        # rms(u) = 1 where the live part allows it, so that norm(u) = y exactly
        dead = torch.where(live, 0.0, m)
        room = (m.shape[0] - u.pow(2).sum(0)).clamp(min=0).sqrt()
        u = u + dead * room / dead.norm(dim=0).clamp(min=1e-12)
        scale = (u * m).sum(0) / (u * u).sum(0)
        scale = torch.where(scale > 0, scale, m.norm(dim=0) / u.norm(dim=0))
        return scale * u - m


def _apply(norm: nn.Module, cols: torch.Tensor) -> torch.Tensor:
    w = next(norm.parameters())
    return norm(cols.T.to(w.device, w.dtype)).T.float().cpu()


def layer_update(
    k: torch.Tensor, cov: torch.Tensor, cfg: MemitConfig, prior: Any = None
) -> torch.Tensor:
    """Right factor V with ΔW = R Vᵀ: (λC + KKᵀ)⁻¹K (MEMIT) or AlphaEdit's projected solve,
    which also keeps the keys `prior` (D_in, n_p) of earlier sequential edits."""
    k = k.double()
    if not cfg.null_space:
        if cfg.mom2_update_weight is None:  # its default depends on the model
            raise LfmError("mom2_update_weight is unset: fill it with memit_defaults")
        lam = cfg.mom2_update_weight
        return common.solve_cov(lam * cov + k @ k.T, k, cfg.cov_ridge).float()
    p = null_projector(cov, cfg.null_threshold)
    kkt = k @ k.T if prior is None else k @ k.T + prior.double() @ prior.double().T
    alpha = cfg.alpha_l2 * cov.diagonal().mean()  # relative to the key scale of this model
    a = p @ kkt
    a.diagonal().add_(alpha)  # + αI
    return torch.linalg.solve(a, p @ k).float()


_PROJECTORS: dict[tuple[str, float], torch.Tensor] = {}


def null_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C with eigenvalues below `threshold` (memoised: the
    eigendecomposition costs seconds and sequential edits reuse the same C)."""
    c = cov.detach().double().cpu().contiguous()
    key = (hashlib.sha256(c.numpy().tobytes()).hexdigest(), threshold)
    if key not in _PROJECTORS:
        vals, vecs = torch.linalg.eigh(c)
        u = vecs[:, vals < threshold]
        if len(_PROJECTORS) >= 8:
            _PROJECTORS.pop(next(iter(_PROJECTORS)))
        _PROJECTORS[key] = u @ u.T
    return _PROJECTORS[key]


def memit_deltas(
    model: nn.Module,
    tok: Any,
    reqs: list[Request],
    cfg: MemitConfig,
    sites: Sequence[EditSite],
    cov: Any,
    prior: Any = None,
) -> tuple[list[Delta], dict[int, torch.Tensor]]:
    """The per-layer deltas and the keys K (D_in, n) each layer's update used.

    Args:
        cfg: the configuration with its defaults filled (`memit_defaults`).
        sites: the edited blocks, in order (`edit_layers`).
        cov: precomputed C per layer, or None for the cached statistics.
        prior: AlphaEdit's keys of earlier sequential edits, {layer: (D_in, n_p)}.
    """
    last, n, each = sites[-1], cfg.n_prefixes, cfg.key_constraint == "each"
    cov = common.prefetch_covariances(model, tok, sites, cfg, cov)
    # the residual and MLP outputs at the last layer, per prefixed prompt, in one pass per request
    h_all, _, m_all = resid_and_keys(model, tok, reqs, last, last, n, each=True)
    p = h_all.shape[1] // len(reqs)  # prefixed prompts per request
    h_mean = h_all.reshape(h_all.shape[0], len(reqs), p).mean(2)
    h0 = h_all if each else h_mean
    per = p if each else 1  # columns per request: P prefixed prompts, or 1 (their mean)
    # z = h + (the residual change δ makes at the last layer's MLP output), column by column
    norm, moved = last.norm_module(model), []
    for i, r in enumerate(progress.each(reqs)):
        outs = m_all[:, i * p : (i + 1) * p]  # (D, P)
        change = resid_change(norm, outs, _delta(model, tok, r, last, cfg, h_mean[:, i], outs.T))
        moved.append(change if each else change.mean(1, keepdim=True))
    z = h0 + torch.cat(moved, 1)
    weight = per**-0.5  # the P columns of one request share its weight: R Kᵀ averages them
    deltas: list[Delta] = []
    used: dict[int, torch.Tensor] = {}
    for j, site in enumerate(sites):
        with common.temporarily(model, deltas):
            h, keys, outs = resid_and_keys(model, tok, reqs, last, site, n, each)
            resid = value_change(site.norm_module(model), outs, (z - h) / (len(sites) - j))
        c = common.covariance(model, tok, site, cfg, cov)
        resid, keys = resid * weight, keys * weight
        v = layer_update(keys, c, cfg, (prior or {}).get(site.layer))
        deltas.append(_low_rank_or_dense(site.module, resid.float(), v))
        used[site.layer] = keys.double()
    return deltas, used


def _low_rank_or_dense(name: str, u: torch.Tensor, v: torch.Tensor) -> Delta:
    """u vᵀ as factors, or as one matrix when that is smaller (many columns)."""
    if u.shape[1] * (u.shape[0] + v.shape[0]) > u.shape[0] * v.shape[0]:
        return Delta(name, dense=u @ v.T)
    return Delta(name, u, v)


def _delta(model, tok, req: Request, site: EditSite, cfg: MemitConfig, h: torch.Tensor, outs):
    """δ at `site`'s MLP output for one request, given its per-prefix MLP outputs (P, D) there."""
    # MEMIT clamps δ relative to the residual norm ‖h‖, not the MLP output's
    scale = float(h.norm() / outs.mean(0).norm())
    return locate.optimise_delta(
        model, tok, req, site, cfg.replace(clamp_norm=cfg.clamp_norm * scale), outs
    )[0]


def warn_if_normed(model: nn.Module, sites: Sequence[EditSite], name: str) -> None:
    """Warn where the layout norms the MLP output (Gemma 3) and the edited window reaches above
    `default_layer`: measured there, most edits did not take (docs/edit.md)."""
    top = default_layer(model)
    if sites[-1].normed and max(s.layer for s in sites) > top:
        warnings.warn(
            f"{name}: on this architecture (MLP output normed before the residual) edits with "
            f"layers above {top} mostly did not take (docs/edit.md); the default window ends there",
            UserWarning,
            stacklevel=2,
        )


def _edit(handle: Any, requests: Any, cfg: MemitConfig, cov: Any) -> Patch:
    """MEMIT's patch, or AlphaEdit's where `cfg.null_space` is on (the model is not changed)."""
    name = "alphaedit" if cfg.null_space else "memit"
    model, tok = common.model_and_tokenizer(handle, f"edit/{name}")
    reqs = common.as_requests(requests)
    sites = edit_sites(model, edit_layers(model, cfg.layers))
    cfg = memit_defaults(cfg, sites[-1])  # the one place: the patch records what was used
    warn_if_normed(model, sites, name)
    with frozen(model):
        deltas = memit_deltas(model, tok, reqs, cfg, sites, cov)[0]
    return make_patch(model, deltas, reqs, name, cfg)


class AlphaEditConfig(MemitConfig):
    null_space: bool = True  # project onto C's null space (the point of AlphaEdit)


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """One request on a tiny Llama, both blocks edited, C from the smoke texts."""
    lm = common.smoke_model("llama", seed)
    cov = {layer: common.smoke_cov(lm.model, lm.tokenizer, layer) for layer in (0, 1)}
    return Example(
        (narrow(lm, level), common.SMOKE_REQUEST), {"cov": cov},
        MemitConfig(v_steps=5, n_prefixes=2),
        lambda patch: {d.module: d.matrix() for d in patch.deltas},
    )  # fmt: skip


# pragma: no mutate end


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _alphaedit_example(level: Access, seed: int) -> Example:
    ex = _example(level, seed)
    return Example(ex.args, ex.kwargs, AlphaEditConfig(v_steps=5, n_prefixes=2), ex.summary)


# pragma: no mutate end


def memit(
    handle: Any,
    requests: Request | Sequence[Request],
    cfg: MemitConfig | None = None,
    *,
    cov: Any = None,
) -> Patch:
    """A MEMIT patch for a batch of requests (model unchanged).

    Args:
        handle: a `LocalModel` (WEIGHTS access: the model and its tokenizer).
        requests: the edits, made together.
        cfg: the configuration (paper defaults; `null_space=True` is AlphaEdit's solve).
        cov: precomputed C per layer ({layer: tensor}); default: cached statistics.
    """
    return _edit(handle, requests, cfg or MemitConfig(), cov)


memit = register(
    "edit", "memit", shape=EDITOR, branch="locate-and-edit", access=Access.WEIGHTS,
    config=MemitConfig, paper="Meng et al. 2023, arXiv 2210.07229 (MEMIT)", example=_example,
    cli="lfm edit apply -m memit", blocks=lambda model, cfg: edit_layers(model, cfg.layers),
)(memit)  # fmt: skip


def alphaedit(
    handle: Any,
    requests: Request | Sequence[Request],
    cfg: AlphaEditConfig | None = None,
    *,
    cov: Any = None,
) -> Patch:
    """AlphaEdit: MEMIT with the update projected onto the null space of C (model unchanged).

    For a sequence of edits that keeps the earlier ones, see `lfm.edit.sequential.alphaedit_step`.

    Args:
        handle: a `LocalModel` (WEIGHTS access: the model and its tokenizer).
        requests: the edits, made together.
        cfg: the configuration (`null_space` is on whatever it says).
        cov: precomputed C per layer ({layer: tensor}); default: cached statistics.
    """
    return _edit(handle, requests, (cfg or AlphaEditConfig()).replace(null_space=True), cov)


alphaedit = register(
    "edit", "alphaedit", shape=EDITOR, branch="locate-and-edit", access=Access.WEIGHTS,
    config=AlphaEditConfig, paper="Fang et al. 2025, arXiv 2410.02355 (AlphaEdit)",
    example=_alphaedit_example,
    cli="lfm edit apply -m alphaedit (sequential edits: --state FILE)",
    blocks=lambda model, cfg: edit_layers(model, cfg.layers),
)(alphaedit)  # fmt: skip
