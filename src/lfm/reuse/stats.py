"""Statistics for data-aware merging, computed once per model and saved as safetensors files.

- Diagonal Fisher (Matena & Raffel 2021, arXiv 2111.09832):
  F_i = E_x E_{y~p_θ(y|x)} [(∇_θ log p_θ(y|x))²], estimated from per-example squared gradients of
  the log-likelihood of a sampled output (`fisher="sample"`), of the true label (`"label"`, the
  empirical Fisher), or the exact expectation over the classes (`"exact"`).
- Input Gram matrices (Jin et al. 2022, arXiv 2212.09849): G = Xᵀ X per linear layer, X the
  layer's inputs stacked over all examples (and positions). `nn.Linear` stores W as (out, in);
  GPT-2's `Conv1D` stores it as (in, out): the file records which, by module type. A 2-D
  convolution is a linear layer on its unfolded input patches: per group g, X_g holds the
  (in/groups)·kh·kw patch entries of every output position, and G is (groups, d, d), so a
  depthwise convolution gets one 9 x 9 Gram per channel (orientation "conv").

A statistics file maps parameter names to tensors (the Fisher of `fc1.weight`, or the Gram matrix
of the layer whose weight is `fc1.weight`). It is a tensor file of format `FORMAT`
(`lfm.core.io.save_tensors`, written atomically) whose metadata says the kind (`fisher`, `gram`,
`adamerging`), the number of examples and, for Gram files, the weight orientation of each layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm.core.hooks import hooked
from lfm.core.io import read_meta, save_tensors
from lfm.errors import LfmError

FORMAT = "lfm.reuse.stats/1"  # the format tag of statistics files (kind in the metadata)
FisherKind = Literal["sample", "label", "exact"]
Batch = Tensor | tuple[Tensor, Tensor]  # inputs, or (inputs, labels)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    out = getattr(out, "logits", out)
    return out[:, -1] if out.dim() == 3 else out  # a sequence model: the next-token distribution


def _split(batch: Batch) -> tuple[Tensor, Tensor | None]:
    return (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)


def _target(logp: Tensor, y: Tensor | None, kind: FisherKind, gen: torch.Generator) -> int:
    """The output whose log-likelihood is differentiated: the label, or a sample y ~ p_θ."""
    if kind == "label":
        if y is None:
            raise LfmError("fisher kind 'label' needs (inputs, labels) batches")
        return int(y)
    return int(torch.multinomial(logp.detach().exp(), 1, generator=gen))


def _example_terms(logp: Tensor, y: Tensor | None, kind: FisherKind, gen) -> list[Tensor]:
    """Scalars whose squared gradients, summed, give one example's Fisher estimate."""
    if kind != "exact":
        return [logp[_target(logp, y, kind, gen)]]
    p = logp.detach().exp()
    return [p[c].sqrt() * logp[c] for c in range(len(logp))]  # Σ_c p_c (∇ log p_c)²


def fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    kind: FisherKind = "sample",
    seed: int = 0,
) -> tuple[dict[str, Tensor], int]:
    """Diagonal Fisher of every trainable parameter, averaged over the examples seen.

    Args:
        model: a classifier (logits (B, C)) or a causal LM (`.logits` (B, T, V), last position).
        batches: input tensors, or (inputs, labels) pairs for `kind="label"`.
        kind: "sample" (y ~ p_θ, the paper's default), "label" (empirical) or "exact".
        seed: seeds the sampled outputs.

    Returns:
        Parameter name -> Fisher (same shape), and the number of examples.
    """
    if kind not in ("sample", "label", "exact"):
        raise LfmError(f"unknown Fisher estimator {kind!r}; choose sample, label or exact")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen, count = torch.Generator().manual_seed(seed), 0
    was = model.training
    model.eval()  # per-example gradients: batch statistics must not mix the examples
    for batch in batches:
        x, y = _split(batch)
        for i in range(len(x)):
            logp = _logits(model, x[i : i + 1]).float().log_softmax(-1)[0]
            for term in _example_terms(logp, None if y is None else y[i], kind, gen):
                grads = torch.autograd.grad(term, list(params.values()), retain_graph=True)
                for n, g in zip(params, grads, strict=True):
                    total[n] += g.float() ** 2
            count += 1
    model.train(was)
    return {n: t / max(count, 1) for n, t in total.items()}, count


def linear_layers(model: nn.Module) -> dict[str, str]:
    """Module name -> weight orientation: "out_in" (`nn.Linear`), "in_out" (`Conv1D`), "conv"."""
    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found[name] = "out_in"
        elif (
            isinstance(mod, nn.Conv2d)
            and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str)
        ):
            found[name] = "conv"  # weight (out, in/groups, kh, kw); Gram (groups, d, d)
        elif type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:
            found[name] = "in_out"  # transformers' GPT-2 Conv1D: y = x W + b, W (in, out)
    return found


def conv_gram(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Σ over examples and output positions of pᵀ p, p a patch of one group: (groups, d, d).

    The patch entries are ordered as in `conv.weight[o].flatten()` (channel, row, column), so
    y[o] = p · w[o] at every position.
    """
    if isinstance(conv.padding, str):
        raise LfmError("conv_gram needs numeric padding, not 'same' or 'valid'")
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, C·k·k, L)
    g = conv.groups
    cols = cols.reshape(x.shape[0], g, -1, cols.shape[-1])  # (B, g, d, L)
    return torch.einsum("bgdl,bgel->gde", cols, cols)


def gram(
    model: nn.Module, batches: Iterable[Batch], modules: Iterable[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """Input Gram matrices Xᵀ X of linear and conv layers (all unless `modules` names some).

    Returns:
        Weight name -> Gram (in, in), weight name -> orientation, and the number of examples.
    """
    layers = linear_layers(model)
    names = list(modules) if modules is not None else list(layers)
    if unknown := [n for n in names if n not in layers]:
        raise LfmError(f"not linear or conv layers of {type(model).__name__}: {', '.join(unknown)}")
    table = dict(model.named_modules())
    grams: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if isinstance(mod, nn.Conv2d):
                grams[name] = grams.get(name, 0) + conv_gram(mod, inputs[0].detach().float())
                return
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (B*T, in)
            grams[name] = grams.get(name, 0) + x.T @ x

        return fn

    count = 0
    with hooked([(table[n], hook(n)) for n in names], pre=True), torch.no_grad():
        for batch in batches:
            x, _ = _split(batch)
            model(x)
            count += len(x)
    key = {n: f"{n}.weight" if n else "weight" for n in names}
    return {key[n]: g for n, g in grams.items()}, {key[n]: layers[n] for n in names}, count


def save_stats(path: str | Path, tensors: Mapping[str, Tensor], kind: str, **meta: Any) -> Path:
    """Write a statistics file of `kind` atomically (format `FORMAT`; `meta` as JSON)."""
    return save_tensors(path, dict(tensors), FORMAT, kind=kind, **meta)


def stats_meta(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The metadata of a statistics file (format, kind, count, orientation ...).

    Args:
        path: the file.
        kind: when given, the kind the file must hold (a Fisher file is not a Gram file).
    """
    meta = read_meta(path, FORMAT)
    if kind is not None and meta.get("kind") != kind:
        raise LfmError(f"{path} holds {meta.get('kind')} statistics, not {kind}")
    return meta


def save_fisher(path: str | Path, model: nn.Module, batches: Iterable[Batch], **kw: Any) -> Path:
    """Compute the diagonal Fisher of `model` (see `fisher`) and save it."""
    table, count = fisher(model, batches, **kw)
    return save_stats(path, table, "fisher", count=count, estimator=kw.get("kind", "sample"))


def save_gram(path: str | Path, model: nn.Module, batches: Iterable[Batch], **kw: Any) -> Path:
    """Compute the input Gram matrices of `model`'s linear and conv layers; save them."""
    table, orient, count = gram(model, batches, **kw)
    return save_stats(path, table, "gram", count=count, orientation=orient)
