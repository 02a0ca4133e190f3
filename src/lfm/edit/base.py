"""Which base model a set of key statistics describes, hashed once per loaded model.

The statistics C = E[k kᵀ] of ROME (arXiv 2202.05262) and MEMIT (arXiv 2210.07229) are cached
on disk under a fingerprint of the weights that produce the keys k at layer l: the embeddings,
blocks 0 … l−1, and block l up to (not including) its MLP output projection — the projection a
method edits does not change its own input keys.

Hashing those weights (~200 MB for SmolLM2 at layer 5) took about half a second per edit, so
the fingerprints of all layers are computed in one pass, once per loaded model object, and kept
with a signature of its parameters (identity, storage, in-place version counter). Any change of
the weights invalidates them — except changes made inside `edits(model)` (`Patch.apply`,
`Undo.revert` and the temporary deltas of a method), which keep the fingerprints of the model
*as it was before the first edit*. The statistics of an edited model are therefore those of its
base model, as in MEMIT and AlphaEdit, which estimate C once and keep it over sequential edits.
A model loaded from a folder of already edited weights is its own base. Writes through
`tensor.data` bypass the version counter and are not seen.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lfm.core import placement
from lfm.core.layouts import get_layout, num_layers
from lfm.errors import LfmError

# model → (parameter signature, fingerprint per layer)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[str]]] = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def hash_bytes(h: Any, p: torch.Tensor) -> None:
    """Feed the bytes of `p` to the hash `h` (its memory read as it is, not copied)."""
    h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())


def _update(h: Any, name: str, p: torch.Tensor) -> None:
    """Hash the name, shape and bytes of `p`."""
    h.update(f"{name}:{tuple(p.shape)}".encode())
    hash_bytes(h, p)


def _params(model: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters under module `prefix` with their full names, in `named_parameters`' order;
    one Accelerate offloaded is read from disk when its turn comes."""
    for name, p in placement.parameters_anywhere(model.get_submodule(prefix)):
        yield f"{prefix}.{name}", p


def hash_key_weights(model: nn.Module) -> list[str]:
    """SHA-256, per layer l, of the weights that determine the MLP keys at l (one pass; a
    model offloaded to disk has one block in memory at a time)."""
    lay = get_layout(model)
    h = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, p in _params(model, lay.embed):
        _update(h, name, p)
    out = []
    for layer in range(num_layers(model)):
        own = f"{lay.layers}.{layer}.{lay.mlp_out}."
        inner = list(_params(model, f"{lay.layers}.{layer}"))
        for name, p in inner:
            if not name.startswith(own):
                _update(h, name, p)
        out.append(h.copy().hexdigest())
        for name, p in inner:  # the edited projection feeds the keys of later layers only
            if name.startswith(own):
                _update(h, name, p)
    return out


def key_fingerprints(model: nn.Module) -> list[str]:
    """Fingerprints of the key-producing weights per layer, of the model's base weights."""
    sig = _signature(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    fps = hash_key_weights(model)
    _CACHE[model] = (sig, fps)
    return fps


@contextmanager
def edits(model: nn.Module) -> Iterator[None]:
    """Weight changes inside the block are edits: the model keeps its base fingerprints."""
    try:
        fps = key_fingerprints(model)
    except LfmError:  # no layout: no statistics to key
        yield
        return
    try:
        yield
    finally:
        _CACHE[model] = (_signature(model), fps)
