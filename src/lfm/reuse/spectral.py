"""Merges in the singular-vector basis of each weight matrix: TSV-Merge, Iso-C and Iso-CTS.

Every tensor of two or more dimensions is read as a matrix (shape[0], rest) — a linear layer as
it is, a conv layer as (out channels, in channels · kernel) — and its weighted task matrices
Δ_i = w_i τ_i are merged through their singular value decompositions:

- TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors", arXiv 2412.00081): keep the top
  k = r / T singular triplets of each Δ_i = U_i Σ_i V_iᵀ (r = min(m, n), T tasks), concatenate
  Û = [U_1,k ... U_T,k], V̂ likewise and Σ̂ = diag(Σ_1,k ... Σ_T,k), whiten the concatenations into
  their nearest orthonormal bases U⊥ = P Qᵀ (Û = P S Qᵀ, orthogonal Procrustes) and V⊥, and
  merge θ = θ_b + α U⊥ Σ̂ V⊥ᵀ.
- Iso-C (Marczak et al. 2025, "No Task Left Behind", arXiv 2502.04959): the task-arithmetic sum
  Δ = Σ_i Δ_i = U Σ Vᵀ with its spectrum flattened to its mean, θ = θ_b + α σ̄ U Vᵀ, σ̄ = tr Σ / r.
- Iso-CTS (same paper): the top k = round(c · r) singular vectors of Δ (the common subspace) and,
  per task, the top s = (r − k) / T singular vectors of Δ_i with the common left subspace projected
  out, Δ_i − U_k U_kᵀ Δ_i (the task-specific subspaces); the concatenated bases are whitened as in
  TSV-Merge and the spectrum of the chosen directions flattened to its mean, θ = θ_b + α σ̄ U⊥ V⊥ᵀ.

Tensors of fewer than two dimensions (biases, norms) take the mean weighted task vector,
θ = θ_b + α Σ_i w_i τ_i / T. SVDs run in float32 on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from lfm.access import Access
from lfm.config import Config
from lfm.registry import register
from lfm.reuse import kernels as K
from lfm.reuse.contract import KERNEL
from lfm.reuse.driver import Ctx, MergeError
from lfm.reuse.examples import merge_example

PLAN = "lfm reuse merge PLAN.yaml (method: {})"


class TsvMergeConfig(Config):
    scale: float = 1.0  # α applied to the merged task matrices (paper: 1.0)
    rank_fraction: float | None = Field(None, gt=0, le=1)  # share of r kept per task (None: 1/T)


class IsoCConfig(Config):
    scale: float = 1.0  # α applied to the isotropic merge (tune it on held-out data)


class IsoCtsConfig(Config):
    scale: float = 1.0  # α applied to the isotropic merge (tune it on held-out data)
    common_fraction: float = Field(0.8, gt=0, le=1)  # c: share of r given to Δ's top directions


def svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD m = U diag(S) Vᵀ as (U, S, V), V with the right singular vectors as columns."""
    try:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError as e:  # e.g. values so large that LAPACK cannot converge
        raise MergeError(f"the SVD of a {list(m.shape)} task matrix failed ({e}); "
                         "check the models and their weights") from None  # fmt: skip
    return u, s, vh.mT


def whiten(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to `a` (orthogonal Procrustes): P Qᵀ for a = P S Qᵀ."""
    p, _, q = svd(a)
    return p @ q.mT


def tsv(deltas: list[Tensor], rank_fraction: float | None = None) -> Tensor:
    """TSV-Merge of task matrices: U⊥ Σ̂ V⊥ᵀ from the top singular triplets of each.

    Args:
        deltas: the weighted task matrices Δ_i, each (m, n).
        rank_fraction: the share of r = min(m, n) kept per task, k = round(fraction · r), at
            least 1 (None: k = r // T, the paper's 1/T).
    """
    r = min(deltas[0].shape)
    k = round(r * rank_fraction) if rank_fraction is not None else r // len(deltas)
    k = max(1, k)
    parts = [svd(d) for d in deltas]
    u = torch.cat([p[0][:, :k] for p in parts], dim=1)  # (m, kT)
    s = torch.cat([p[1][:k] for p in parts])  # (kT,)
    v = torch.cat([p[2][:, :k] for p in parts], dim=1)  # (n, kT)
    return (whiten(u) * s) @ whiten(v).mT


def iso_c_matrix(delta: Tensor) -> Tensor:
    """Iso-C of a summed task matrix: σ̄ U Vᵀ, σ̄ the mean of its r singular values."""
    u, s, v = svd(delta)
    return s.mean() * (u @ v.mT)


def iso_cts_matrix(deltas: list[Tensor], common_fraction: float) -> Tensor:
    """Iso-CTS of task matrices: Δ's top k directions plus each task's top (r − k) / T directions
    outside them, whitened, with one singular value: the mean of the chosen ones.

    Args:
        deltas: the weighted task matrices Δ_i, each (m, n).
        common_fraction: c, the share of r = min(m, n) given to the common subspace.
    """
    r = min(deltas[0].shape)
    k = max(1, round(common_fraction * r))
    u, s, v = svd(_sum(deltas))
    us, vs, ss = [u[:, :k]], [v[:, :k]], [s[:k]]
    per_task = (r - k) // len(deltas)
    if per_task == 0:  # no task-specific directions: the common basis is orthonormal already
        return s[:k].mean() * (us[0] @ vs[0].mT)
    common = u[:, :k]
    for d in deltas:
        ut, st, vt = svd(d - common @ (common.mT @ d))  # Δ_i outside the common left subspace
        us.append(ut[:, :per_task])
        vs.append(vt[:, :per_task])
        ss.append(st[:per_task])
    return torch.cat(ss).mean() * (whiten(torch.cat(us, 1)) @ whiten(torch.cat(vs, 1)).mT)


def _sum(deltas: list[Tensor]) -> Tensor:
    """Σ_i Δ_i (one order of summation for every method, so that Iso-CTS with c = 1 is Iso-C)."""
    return torch.stack(deltas).sum(0)


def _merge(
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    scale: float,
    matrix: Callable[[list[Tensor]], Tensor],
) -> Tensor:
    """θ_b + α · matrix([w_i τ_i as matrices]) for tensors of 2+ dimensions, else the mean."""
    deltas = [w * t for w, t in zip(weights, K.task_vectors(base, tensors), strict=True)]
    total = _sum(deltas)
    if base.dim() < 2 or not torch.isfinite(total).all():
        # vectors: the mean task vector; non-finite inputs: returned as such for the driver's
        # one-line error (an SVD would fail on them)
        merged = total / len(deltas)
    else:
        merged = matrix([d.reshape(d.shape[0], -1) for d in deltas]).reshape(base.shape)
    return merged.mul_(scale).add_(base.float())


def tsv_merge(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Each task's top singular triplets, their bases whitened together, scaled by α."""
    assert base is not None
    return _merge(base, tensors, weights, cfg.scale, lambda ds: tsv(ds, cfg.rank_fraction))


tsv_merge = register(
    "reuse", "tsv_merge", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=TsvMergeConfig, paper="Gargiulo et al. 2025, CVPR, arXiv 2412.00081",
    example=merge_example(), cli=PLAN.format("tsv_merge"),
)(tsv_merge)  # fmt: skip


def iso_c(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """The task-arithmetic sum with a flat (isotropic) spectrum, scaled by α."""
    assert base is not None
    return _merge(base, tensors, weights, cfg.scale, lambda ds: iso_c_matrix(_sum(ds)))


iso_c = register(
    "reuse", "iso_c", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=IsoCConfig, paper="Marczak et al. 2025, ICML, arXiv 2502.04959",
    example=merge_example(), cli=PLAN.format("iso_c"),
)(iso_c)  # fmt: skip


def iso_cts(
    base: Tensor | None, tensors: list[Tensor], weights: list[float], cfg: Any, ctx: Ctx
) -> Tensor:
    """Common and task-specific singular directions with a flat spectrum, scaled by α."""
    assert base is not None
    return _merge(
        base, tensors, weights, cfg.scale, lambda ds: iso_cts_matrix(ds, cfg.common_fraction)
    )


iso_cts = register(
    "reuse", "iso_cts", shape=KERNEL, branch="weight interpolation", access=Access.WEIGHTS,
    config=IsoCtsConfig, paper="Marczak et al. 2025, ICML, arXiv 2502.04959",
    example=merge_example(), cli=PLAN.format("iso_cts"),
)(iso_cts)  # fmt: skip
