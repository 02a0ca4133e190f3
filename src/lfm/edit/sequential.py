"""Sequential AlphaEdit (Fang et al. 2025, arXiv 2410.02355): the state carried between edits.

AlphaEdit keeps earlier edits by solving each new update with the keys K_p of all previous
edits in the normal equations (`lfm.edit.memit.layer_update`):

    ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹,    P the projector onto C's null space

The state is that K_p, per edited layer, as an explicit value: `alphaedit_step` takes a state
and returns the patch and the next state; `AlphaEditState.save`/`load` write it as safetensors,
so a sequence of edits can span separate processes (`lfm edit apply --method alphaedit --state`).
The state also records the base model's statistics fingerprint (P comes from the base model's
C, `lfm.edit.base`) and the fingerprint of the edited weights once its last patch is applied,
so a step on other weights, or before the previous patch was applied, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lfm.core.hooks import frozen
from lfm.core.io import load_tensors, save_tensors
from lfm.edit import base, common, locate
from lfm.edit.memit import (
    AlphaEditConfig,
    MemitConfig,
    edit_layers,
    memit_defaults,
    memit_deltas,
    warn_if_normed,
)
from lfm.edit.patch import Patch, fingerprint, make_patch
from lfm.edit.requests import Request
from lfm.edit.site import edit_sites
from lfm.errors import LfmError

FORMAT = "lfm-alphaedit-state/1"


@dataclass(frozen=True)
class AlphaEditState:
    """Keys of the edits made so far, per layer, and the weights they were made on."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # {layer: (D_in, n) float64}
    base: str = ""  # key-statistics fingerprint of the base model (last edited layer)
    after: str = ""  # fingerprint of the edited modules with every patch so far applied
    per_edit: int = 1  # key columns per edit (P with `key_constraint="each"`, else 1)

    @property
    def edits(self) -> int:
        return next(iter(self.keys.values())).shape[1] // self.per_edit if self.keys else 0

    def save(self, path: str | Path) -> Path:
        """Write the state as one safetensors file (tagged `FORMAT`), atomically."""
        tensors = {f"keys.{layer}": k for layer, k in self.keys.items()}
        return save_tensors(
            path, tensors, FORMAT, base=self.base, after=self.after, layers=sorted(self.keys),
            per_edit=self.per_edit,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> AlphaEditState:
        """Read a state written by `save`."""
        tensors, meta = load_tensors(path, FORMAT)
        keys = {int(k.split(".")[1]): t for k, t in tensors.items()}
        return cls(keys, str(meta["base"]), str(meta["after"]), int(meta.get("per_edit", 1)))


def _check(
    state: AlphaEditState, model: Any, layers: list[int], modules: list[str], per_edit: int
) -> None:
    if not state.keys:
        return
    if sorted(state.keys) != layers:
        raise LfmError(f"the state edits layers {sorted(state.keys)}, this config {layers}")
    if state.per_edit != per_edit:
        raise LfmError(
            f"the state keeps {state.per_edit} key(s) per edit, this config {per_edit}; "
            "use the key_constraint and n_prefixes the sequence started with"
        )
    if base.key_fingerprints(model)[layers[-1]] != state.base:
        raise LfmError(
            "the state was made on another base model; load the base model and apply the "
            "earlier patches to it (`lfm edit apply ... --on PATCH`)"
        )
    if fingerprint(model, modules) != state.after:
        raise LfmError("apply the previous AlphaEdit patches in order before the next step")


def alphaedit_step(
    handle: Any,
    requests: Request | Sequence[Request],
    state: AlphaEditState | None = None,
    cfg: MemitConfig | None = None,
    *,
    cov: Any = None,
) -> tuple[Patch, AlphaEditState]:
    """One sequential AlphaEdit step: a patch (model unchanged) and the state after it.

    Apply the patch before the next step; the step checks that it was.

    Args:
        handle: a `LocalModel` (the model and its tokenizer; WEIGHTS access, checked here as
            this step is not a registered method of its own).
        requests: the edits of this step.
        state: what earlier steps returned (None or empty: the first step).
        cfg: the configuration (`null_space` is forced on).
        cov: precomputed C per layer ({layer: tensor}); default: the base model's statistics.
    """
    cfg = (cfg or AlphaEditConfig()).replace(null_space=True)
    model, tok = common.model_and_tokenizer(handle, "edit/alphaedit")
    reqs, state = common.as_requests(requests), state or AlphaEditState()
    sites = edit_sites(model, edit_layers(model, cfg.layers))
    cfg = memit_defaults(cfg, sites[-1])  # the one place for this step
    layers, modules = [s.layer for s in sites], [s.module for s in sites]
    per_edit = len(locate.prefixes(cfg.n_prefixes)) if cfg.key_constraint == "each" else 1
    _check(state, model, layers, modules, per_edit)
    warn_if_normed(model, sites, "edit/alphaedit")
    with frozen(model):
        deltas, keys = memit_deltas(model, tok, reqs, cfg, sites, cov, state.keys)
    patch = make_patch(model, deltas, reqs, "alphaedit", cfg)
    with common.temporarily(model, deltas):
        after = fingerprint(model, modules)
    grown = {
        layer: keys[layer] if layer not in state.keys else torch.cat([state.keys[layer], keys[layer]], 1)
        for layer in layers
    }  # fmt: skip
    fp = base.key_fingerprints(model)[layers[-1]]
    return patch, AlphaEditState(grown, fp, after, per_edit)
