"""UltraEdit: lifelong editing in one closed-form step (Gu et al. 2025, arXiv 2505.14679).

No δ search, no subject, no memory: a turn of edits is one forward and one backward pass, and
the parameter shift of each edited MLP down-projection W (out, in) is solved in closed form from
what that pass saw there. The steps of the paper's method, in its notation (§3):

  1. Editing feature. At every position whose next-token prediction is a target token, h_i is
     the projection's input (D_in) and ∇_i the gradient of the target's NLL with respect to the
     projection's output (D_out); z_i = [h_i ‖ ∇_i]                        (`editing_features`)
  2. Lifelong normalisation. Running statistics over every turn so far, updated with the n
     features of this turn (mean z̄, variance Var(z)) by the parallel (Chan/Welford) rule:
        δ = z̄ − μ,  μ ← μ + δ·n/(N+n),  s² ← s² + n·Var(z) + δ²·N·n/(N+n),  N ← N + n,
        σ = √(s²/(N − 1) + ε)                                              (`RunningStats.update`)
     and the features normalised with them, ẑ_i = (z_i − μ)/σ = [ĥ_i ‖ ∇̂_i]   (`RunningStats.normalise`)
  3. Parameter shift. The target of each key is the output change of one gradient step on the
     normalised feature, v_i = −η ‖ĥ_i‖² ∇̂_i, and the shift is the ridge solution of
     ΔW h_i ≈ v_i over the turn's keys H (n, D_in) as the layer sees them:
        ΔW = argmin ‖H ΔWᵀ − V‖² + λ‖ΔW‖² = Vᵀ (H Hᵀ + λ I)⁻¹ H               (`parameter_shift`)
     solved on the n×n side (n ≪ D_in), so ΔW is stored as factors of rank n.

The normalised feature shapes the targets only; the solve uses the raw keys, because the patch
acts on the raw keys at inference (as in the authors' released editor, and MALMEN before it,
arXiv 2311.04661, whose meta-learned network the normalisation replaces).

Defaults. η = 1e-6 and λ = 1 are the paper's. The edited blocks are the paper's GPT-J window,
down-projections (`fc_out`) of blocks 18–26 of 28, scaled to the model's depth: round(18·L/28)
… round(26·L/28), blocks 19–28 of SmolLM2's 30 (`default_layers`). Statistics are kept per
edited layer. A turn is one call; all its requests are edited together, every layer's shift
computed from the same pass on the weights the earlier turns left (apply each patch before the
next turn; `ultraedit_step` checks it). The state between turns — N, μ and s² per layer — is a
value (`UltraEditState`) saved and loaded as safetensors.

At the first turn the statistics are those of that turn alone: a first turn with a single
feature (one request with a one-token target) normalises it to zero and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lfm.access import Access, narrow
from lfm.config import Config
from lfm.core.hooks import frozen, hooked
from lfm.core.io import load_tensors, save_tensors
from lfm.core.layouts import num_layers
from lfm.edit import common, progress
from lfm.edit.contract import EDITOR
from lfm.edit.patch import Delta, Patch, fingerprint, make_patch
from lfm.edit.requests import Request, build_batch
from lfm.edit.site import EditSite, edit_sites, layer_of
from lfm.errors import LfmError
from lfm.registry import Example, register

FORMAT = "lfm-ultraedit-state/1"
PAPER = "Gu et al. 2025, arXiv 2505.14679 (UltraEdit)"
GPTJ_WINDOW, GPTJ_DEPTH = (18, 26), 28  # the paper's edited fc_out blocks on GPT-J


class UltraEditConfig(Config):
    # edited blocks (their MLP down-projections), distinct; None or () = the paper's GPT-J window
    # scaled to the depth (`default_layers`); negative counts from the top
    layers: tuple[int, ...] | None = None
    lr: float = Field(1e-6, gt=0)  # η, the step of the target v = −η‖ĥ‖²∇̂ (paper: 1e-6)
    ridge: float = Field(1.0, gt=0)  # λ in (H Hᵀ + λI) (paper: 1, the identity)
    eps: float = Field(1e-8, gt=0)  # ε under the square root of σ
    # False: z used as it is, no lifelong statistics (for ablation only)
    normalise: bool = True


def default_layers(model: nn.Module) -> list[int]:
    """The paper's GPT-J window (blocks 18–26 of 28) scaled to this model's depth L."""
    n = num_layers(model)
    lo, hi = (min(round(b * n / GPTJ_DEPTH), n - 1) for b in GPTJ_WINDOW)
    return list(range(lo, hi + 1))


def edit_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """The edited blocks, ascending (None or empty: `default_layers`)."""
    if not layers:
        return default_layers(model)
    blocks = sorted(layer_of(model, layer) for layer in layers)
    if len(set(blocks)) < len(blocks):
        raise LfmError(f"layers {list(layers)} name a block twice (as blocks {blocks})")
    return blocks


@dataclass(frozen=True)
class RunningStats:
    """N, μ and s² (the summed squared deviation) of the features seen so far, float64."""

    count: float
    mean: torch.Tensor  # (D_in + D_out,)
    m2: torch.Tensor  # (D_in + D_out,)

    @classmethod
    def empty(cls, dim: int) -> RunningStats:
        zeros = torch.zeros(dim, dtype=torch.float64)
        return cls(0.0, zeros, zeros.clone())

    def update(self, z: torch.Tensor) -> RunningStats:
        """The statistics with this turn's features z (n, D) added (the parallel rule)."""
        z = z.double()
        n, batch_mean = z.shape[0], z.mean(0)
        batch_m2 = (z - batch_mean).pow(2).sum(0)  # n·Var(z), Var the turn's biased variance
        total = self.count + n
        delta = batch_mean - self.mean
        mean = self.mean + delta * n / total
        m2 = self.m2 + batch_m2 + delta.pow(2) * self.count * n / total
        return RunningStats(total, mean, m2)

    def std(self, eps: float) -> torch.Tensor:
        """σ = √(s²/(N − 1) + ε); a single feature so far has variance 0, not 0/0."""
        return (self.m2 / max(self.count - 1.0, 1.0) + eps).sqrt()

    def normalise(self, z: torch.Tensor, eps: float) -> torch.Tensor:
        """ẑ = (z − μ)/σ."""
        return (z.double() - self.mean) / self.std(eps)


@dataclass(frozen=True)
class UltraEditState:
    """The lifelong statistics per edited layer and the weights the next turn must see."""

    stats: dict[int, RunningStats] = field(default_factory=dict)  # {layer: statistics}
    after: str = ""  # fingerprint of the edited modules with every patch so far applied
    turns: int = 0

    def save(self, path: str | Path) -> Path:
        """Write the state as one safetensors file (tagged `FORMAT`), atomically."""
        tensors = {}
        for layer, s in self.stats.items():
            tensors[f"mean.{layer}"], tensors[f"m2.{layer}"] = s.mean, s.m2
            tensors[f"count.{layer}"] = torch.tensor([s.count], dtype=torch.float64)
        return save_tensors(
            path, tensors, FORMAT, after=self.after, turns=self.turns, layers=sorted(self.stats)
        )

    @classmethod
    def load(cls, path: str | Path) -> UltraEditState:
        """Read a state written by `save`."""
        t, meta = load_tensors(path, FORMAT)
        stats = {
            int(layer): RunningStats(
                float(t[f"count.{layer}"][0]), t[f"mean.{layer}"], t[f"m2.{layer}"]
            )
            for layer in meta["layers"]
        }
        return cls(stats, str(meta["after"]), int(meta["turns"]))


def editing_features(
    model: nn.Module, tok: Any, req: Request, sites: Sequence[EditSite]
) -> dict[int, torch.Tensor]:
    """z = [h ‖ ∇] per layer, one row per target token: (len(target), D_in + D_out) float64.

    One forward and one backward pass: each projection's output gets a zero "tap" that requires
    a gradient, so ∂NLL/∂tap is ∂NLL/∂output through every path, the weights stay frozen.
    """
    batch = build_batch(tok, req, [""])
    pos, ids = torch.tensor(batch.target_pos[0]), torch.tensor(batch.target_ids[0])
    keys: dict[str, torch.Tensor] = {}
    taps: dict[str, torch.Tensor] = {}

    def tap(name: str) -> Any:
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            keys[name] = args[0].detach()
            taps[name] = torch.zeros_like(out, requires_grad=True)
            return out + taps[name]

        return fn

    dev = next(model.parameters()).device
    with hooked([(s.projection(model), tap(s.module)) for s in sites]), torch.enable_grad():
        logits = model(
            input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev)
        ).logits[0, pos.to(dev)]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids.to(dev), reduction="sum")
        grads = torch.autograd.grad(nll, [taps[s.module] for s in sites])
    return {
        s.layer: torch.cat([keys[s.module][0, pos], g[0, pos]], -1).double().cpu()
        for s, g in zip(sites, grads, strict=True)
    }


def targets(z_hat: torch.Tensor, d_in: int, lr: float) -> torch.Tensor:
    """v_i = −η ‖ĥ_i‖² ∇̂_i from normalised features [ĥ ‖ ∇̂] (n, D_in + D_out) → (n, D_out)."""
    h_hat, g_hat = z_hat[:, :d_in], z_hat[:, d_in:]
    return -lr * h_hat.pow(2).sum(1, keepdim=True) * g_hat


def parameter_shift(
    keys: torch.Tensor, values: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of ΔW = u vᵀ = Vᵀ (H Hᵀ + λI)⁻¹ H, the ridge solution of ΔW h_i ≈ v_i.

    Args:
        keys: H (n, D_in), the projection's raw inputs.
        values: V (n, D_out), the targets.
        ridge: λ.
    """
    h = keys.double()
    gram = h @ h.T + ridge * torch.eye(len(h), dtype=torch.float64)
    right = torch.linalg.solve(gram, h)  # (H Hᵀ + λI)⁻¹ H, (n, D_in)
    return values.double().T.float(), right.T.float()


def _check(state: UltraEditState, model: nn.Module, layers: list[int], modules: list[str]):
    if not state.stats:
        return
    if sorted(state.stats) != layers:
        raise LfmError(f"the state edits layers {sorted(state.stats)}, this config {layers}")
    if fingerprint(model, modules) != state.after:
        raise LfmError("apply the previous UltraEdit patches in order before the next turn")


def ultraedit_step(
    handle: Any,
    requests: Request | Sequence[Request],
    state: UltraEditState | None = None,
    cfg: UltraEditConfig | None = None,
) -> tuple[Patch, UltraEditState]:
    """One UltraEdit turn: a patch (model unchanged) and the lifelong state after it.

    Apply the patch before the next turn; the turn checks that it was.

    Args:
        handle: a `LocalModel` (WEIGHTS access, checked here as the step is not registered).
        requests: the edits of this turn, made together.
        state: what the earlier turns returned (None or empty: the first turn).
        cfg: the configuration (paper defaults).
    """
    model, tok = common.model_and_tokenizer(handle, "edit/ultraedit")
    cfg, reqs, state = (
        cfg or UltraEditConfig(),
        common.as_requests(requests),
        state or UltraEditState(),
    )
    sites = edit_sites(model, edit_layers(model, cfg.layers))
    layers, modules = [s.layer for s in sites], [s.module for s in sites]
    cfg = cfg.replace(layers=tuple(layers))  # the patch records the blocks used
    _check(state, model, layers, modules)
    with frozen(model):
        feats = [editing_features(model, tok, r, sites) for r in progress.each(reqs)]
    deltas, stats = [], dict(state.stats)
    for site in sites:
        z = torch.cat([f[site.layer] for f in feats])  # (n, D_in + D_out)
        if cfg.normalise:
            stats[site.layer] = stats.get(site.layer, RunningStats.empty(z.shape[1])).update(z)
            z_hat = stats[site.layer].normalise(z, cfg.eps)
        else:
            z_hat = z
        values = targets(z_hat, site.d_in, cfg.lr)
        u, v = parameter_shift(z[:, : site.d_in], values, cfg.ridge)
        deltas.append(Delta(site.module, u, v))
    patch = make_patch(model, deltas, reqs, "ultraedit", cfg)
    patch.info["turn"] = state.turns + 1
    with common.temporarily(model, deltas):
        after = fingerprint(model, modules)
    return patch, UltraEditState(stats, after, state.turns + 1)


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """A turn of two requests on a tiny Llama (two features: the first turn's statistics are not
    degenerate); λ small against its ~0.05-long keys, as the paper's λ = 1 is against a 7B's."""
    lm = common.smoke_model("llama", seed)
    reqs = [common.SMOKE_REQUEST, Request("The old city of Kyoto", "Kyoto", "Berlin")]
    return Example(
        (narrow(lm, level), reqs), {}, UltraEditConfig(lr=0.01, ridge=1e-4),
        lambda patch: {d.module: d.matrix() for d in patch.deltas},
    )  # fmt: skip


# pragma: no mutate end


def ultraedit(
    handle: Any,
    requests: Request | Sequence[Request],
    cfg: UltraEditConfig | None = None,
    *,
    state: UltraEditState | None = None,
) -> Patch:
    """An UltraEdit patch for one turn of requests (model unchanged).

    For a lifelong sequence, `ultraedit_step` also returns the statistics to carry.

    Args:
        handle: a `LocalModel` (WEIGHTS access: it reads activations and gradients).
        requests: the edits of the turn, made together.
        cfg: the configuration (paper defaults).
        state: the statistics of earlier turns (None: this is the first).
    """
    return ultraedit_step(handle, requests, state, cfg)[0]


ultraedit = register(
    "edit", "ultraedit", shape=EDITOR, branch="locate-and-edit", access=Access.WEIGHTS,
    config=UltraEditConfig, paper=PAPER, example=_example,
    cli="lfm edit apply -m ultraedit --state FILE (one turn each call; the state carries across)",
)(ultraedit)  # fmt: skip
