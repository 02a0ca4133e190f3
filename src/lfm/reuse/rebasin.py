"""Mode connectivity by permutation alignment: weight matching (Git Re-Basin, Ainsworth et al.
2022, arXiv 2209.04836).

Hidden units of a network can be permuted without changing its function. Weight matching finds,
for model B, permutations π_l of every hidden layer that bring its weights close to model A's:

    max_π Σ_l ⟨W_l^A, P_l W_l^B P_{l−1}ᵀ⟩_F

solved by coordinate ascent: for one layer at a time (in random order), with the other
permutations fixed, the best π_l is a linear assignment problem over the cost
C = Σ_{(w, axis) ∈ l} A_w B̃_wᵀ (`scipy.optimize.linear_sum_assignment`); repeated until no
permutation changes. After alignment, A and B can be interpolated with a much lower loss barrier.

A permutation spec is data: permutation name -> the (parameter, axis) pairs it acts on. `chain_spec`
builds one for a chain of Linear / Conv2d layers, each optionally followed by a BatchNorm whose
weights and running statistics share the layer's output permutation.

`rebasin(models)` is the registered aligner: every model after the first is aligned to the first,
with the spec read from the first model's structure. `align_pair` and `weight_matching` are the
steps below it, for one pair and a spec of one's own.

Weight matching runs where the tensors are (`to_device` moves a state dict; `rebasin_files` and
`lfm reuse rebasin --device` do): the similarity products and the permuting there, each linear
assignment on the CPU (SciPy), the permutations it returns on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from lfm.access import Access
from lfm.config import Config
from lfm.registry import Example, register
from lfm.reuse.contract import ALIGNER, reader_of
from lfm.reuse.driver import MergeError
from lfm.reuse.examples import classifiers

Spec = dict[str, list[tuple[str, int]]]  # permutation -> [(parameter name, axis)]
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class RebasinConfig(Config):
    max_iter: int = Field(100, ge=1)  # sweeps over all layers at most (stops when none changes)
    seed: int = Field(0, ge=0, lt=2**63)  # seeds the order in which layers are visited


def chain_spec(model: nn.Module) -> Spec:
    """The permutation spec of a chain of Linear / Conv2d layers (in registration order).

    The output units of every layer but the last are permuted, with its BatchNorm (if one follows)
    and the input axis of the next layer. A global pooling between a conv and a linear layer keeps
    channels as features; a flatten of spatial maps does not (give such a spec by hand).
    """
    layers: list[tuple[str, nn.Module, list[str]]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d):
            layers.append((name, mod, []))
        elif isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d) and layers:
            layers[-1][2].append(name)
    spec: Spec = {}
    for i, (name, mod, bns) in enumerate(layers[:-1]):
        axes = [(f"{name}.weight", 0)] + ([(f"{name}.bias", 0)] if mod.bias is not None else [])
        axes += [(f"{bn}.{k}", 0) for bn in bns for k in BN_KEYS]
        spec[f"P{i}"] = [*axes, (f"{layers[i + 1][0]}.weight", 1)]
    return spec


def chain_spec_from_state_dict(sd: Mapping[str, Tensor]) -> Spec:
    """`chain_spec` read from a state dict alone: layers are the 2-D / 4-D `.weight` tensors in
    key order, and a module with `running_mean` is the BatchNorm of the layer before it."""
    layers: list[tuple[str, bool, list[str]]] = []  # (prefix, has bias, batchnorms)
    for key, v in sd.items():
        prefix = key.rsplit(".", 1)[0]
        if key.endswith(".running_mean") and layers:
            layers[-1][2].append(prefix)
        elif key.endswith(".weight") and v.dim() in (2, 4) and f"{prefix}.running_mean" not in sd:
            layers.append((prefix, f"{prefix}.bias" in sd, []))
    spec: Spec = {}
    for i, (name, bias, bns) in enumerate(layers[:-1]):
        axes = [(f"{name}.weight", 0)] + ([(f"{name}.bias", 0)] if bias else [])
        axes += [(f"{bn}.{k}", 0) for bn in bns for k in BN_KEYS]
        spec[f"P{i}"] = [*axes, (f"{layers[i + 1][0]}.weight", 1)]
    return spec


def _axes_of(spec: Spec) -> dict[str, list[tuple[str, int]]]:
    """Parameter name -> [(permutation, axis)]."""
    out: dict[str, list[tuple[str, int]]] = {}
    for perm, pairs in spec.items():
        for name, axis in pairs:
            out.setdefault(name, []).append((perm, axis))
    return out


def permute_tensor(
    axes: list[tuple[str, int]], w: Tensor, perms: Mapping[str, Tensor], skip: str | None = None
) -> Tensor:
    """`w` with every permutation on its axes applied (but `skip`)."""
    for perm, axis in axes:
        if perm != skip:
            w = w.index_select(axis, perms[perm])
    return w


def apply_permutation(
    spec: Spec, sd: Mapping[str, Tensor], perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A state dict with hidden units permuted: unit i of the result is unit perms[p][i] of `sd`."""
    axes = _axes_of(spec)
    return {k: permute_tensor(axes.get(k, []), v, perms) for k, v in sd.items()}


def _cost(spec: Spec, a: Mapping[str, Tensor], b: Mapping[str, Tensor], perms, p: str) -> Tensor:
    axes = _axes_of(spec)
    cost = None
    for name, axis in spec[p]:
        n = a[name].shape[axis]
        wa = a[name].float().movedim(axis, 0).reshape(n, -1)
        wb = permute_tensor(axes[name], b[name].float(), perms, skip=p).movedim(axis, 0)
        term = wa @ wb.reshape(n, -1).T  # (n, n): similarity of unit i of A and unit j of B
        cost = term if cost is None else cost + term
    assert cost is not None
    return cost


def _sizes(spec: Spec, sd: Mapping[str, Tensor]) -> dict[str, int]:
    return {p: sd[pairs[0][0]].shape[pairs[0][1]] for p, pairs in spec.items()}


def to_device(sd: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A state dict with every tensor on `device` (the tensors already there as they are)."""
    return {k: v.to(device) for k, v in sd.items()}


def weight_matching(
    spec: Spec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    cfg: RebasinConfig | None = None,
) -> dict[str, Tensor]:
    """Permutations of `b`'s hidden units that maximise Σ ⟨A, permuted B⟩ (coordinate ascent).

    The similarity products run where `a` and `b` are (one device for both); each assignment on
    the CPU (SciPy); the permutations are returned on that device."""
    from scipy.optimize import linear_sum_assignment  # ~1 s to import: only when aligning

    cfg = cfg or RebasinConfig()
    first = next(iter(spec.values()), [])
    device = a[first[0][0]].device if first else torch.device("cpu")
    perms = {p: torch.arange(n, device=device) for p, n in _sizes(spec, a).items()}
    gen, names = torch.Generator().manual_seed(cfg.seed), list(spec)
    for _ in range(cfg.max_iter):
        changed = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            p = names[i]
            cost = _cost(spec, a, b, perms, p)
            _, col = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long, device=device)
            rows = torch.arange(len(new), device=device)
            if cost[rows, new].sum() > cost[rows, perms[p]].sum() + 1e-9 * cost.abs().max():
                perms[p], changed = new, True
        if not changed:
            break
    return perms


def align_pair(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], spec: Spec, cfg: RebasinConfig | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Align `b` to `a` by weight matching; returns the permuted `b` and the permutations."""
    perms = weight_matching(spec, a, b, cfg)
    return apply_permutation(spec, b, perms), perms


def read_state_dict(model: Any) -> dict[str, Tensor]:
    """The tensors of a white-box handle, module, state dict or weights on disk, in key order."""
    reader = reader_of(model)
    return {k: reader.get(k) for k in reader.keys()}  # noqa: SIM118 (a Reader, not a dict)


def spec_of(model: Any) -> Spec:
    """The chain spec of a model: from its module when it has one, else from its state dict."""
    module = model if isinstance(model, nn.Module) else getattr(model, "model", None)
    if isinstance(module, nn.Module):
        return chain_spec(module)
    return chain_spec_from_state_dict(read_state_dict(model))


def check_same_layout(sds: list[dict[str, Tensor]], spec: Spec) -> None:
    """A one-line `MergeError` unless there is a layer to align and every model has the first's
    tensors and shapes."""
    if not spec:
        raise MergeError("no chain of two or more Linear / Conv2d layers to align")
    for i, sd in enumerate(sds[1:], 1):
        if sd.keys() != sds[0].keys() or any(sd[k].shape != sds[0][k].shape for k in sd):
            raise MergeError(f"model {i} does not have the tensors and shapes of model 0")


def _example(level: Access, seed: int) -> Example:
    _, handles = classifiers(level, [seed, seed + 1, seed + 2])
    return Example((handles,), cfg=RebasinConfig(max_iter=10))


@register(
    "reuse", "rebasin", shape=ALIGNER, branch="mode connectivity", access=Access.WEIGHTS,
    config=RebasinConfig, paper="Ainsworth et al. 2022, arXiv 2209.04836", example=_example,
    cli="lfm reuse rebasin A.safetensors B.safetensors -o B_aligned.safetensors",
)  # fmt: skip
def rebasin(
    models: Sequence[Any], cfg: Any = None, *, spec: Spec | None = None
) -> list[dict[str, Tensor]]:
    """Align every model after the first to the first by weight matching.

    Args:
        models: white-box handles, modules, state dicts or weight files of one architecture.
        cfg: a `RebasinConfig` (sweeps at most, the seed of the layer order).
        spec: the permutation spec; default: read from the first model (`chain_spec` of its
            module, else `chain_spec_from_state_dict`).

    Returns:
        One state dict per model: the first as given, every other with its hidden units permuted
        into the first's coordinates (the function of each model is unchanged).
    """
    sds = [read_state_dict(m) for m in models]
    spec = spec if spec is not None else spec_of(models[0])
    check_same_layout(sds, spec)
    return [sds[0]] + [align_pair(sds[0], sd, spec, cfg)[0] for sd in sds[1:]]
