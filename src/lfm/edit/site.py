"""Where a locate-and-edit method writes: the edit site of one block, resolved once per edit.

ROME (Meng et al. 2022, arXiv 2202.05262), MEMIT (arXiv 2210.07229), AlphaEdit (arXiv 2410.02355)
and FT-L edit the MLP output projection W of a block, read as a linear associative memory
W k ≈ v whose input k is the key. What the maths needs to know of the architecture is fixed here,
once, at a method's entry point, and passed down: the block and projection names, the weight's
shape in (out, in) orientation and how it is stored (GPT-2's `Conv1D` keeps (in, out); decided by
the module's type, never by its shape), and the norm between the MLP output and the residual where
the layout has one (Gemma 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lfm.core.layouts import get_layout, module_name, num_layers
from lfm.errors import LfmError


def is_conv1d(mod: nn.Module) -> bool:
    """GPT-2's Conv1D keeps its weight as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, Conv1D)


@dataclass(frozen=True)
class EditSite:
    """The MLP output projection of one block, as a locate-and-edit method sees it."""

    layer: int  # the block, 0 … n−1
    block: str  # the block's module name
    module: str  # its MLP output projection's module name
    shape: tuple[int, int]  # the projection's weight in (out, in) orientation: (D_out, D_in)
    conv1d: bool  # the weight is stored (in, out) (GPT-2's Conv1D)
    norm: str | None  # the norm between the MLP output and the residual (Gemma 3), else None

    @property
    def normed(self) -> bool:
        """The layout norms the MLP output before the residual."""
        return self.norm is not None

    @property
    def d_in(self) -> int:
        return self.shape[1]

    def projection(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.module)

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The projection's weight in (out, in) orientation (a view, not a copy)."""
        w = self.projection(model).weight
        return w.T if self.conv1d else w

    def norm_module(self, model: nn.Module) -> nn.Module | None:
        return model.get_submodule(self.norm) if self.norm else None


def default_layer(model: nn.Module) -> int:
    """About one sixth of the depth: where causal tracing puts subject recall in GPT-J (5 of 28).

    SmolLM2 (30 blocks) → 5, Gemma 3 270M (18) → 3, a 2-block test model → 0.
    """
    return min(round(num_layers(model) / 6), num_layers(model) - 1)


def layer_of(model: nn.Module, layer: int | None) -> int:
    """The block index in 0 … n−1 (None: `default_layer`; negative counts from the top, as in
    Python: −1 is the last block). Anything else is a one-line `LfmError` naming the range."""
    n = num_layers(model)
    layer = default_layer(model) if layer is None else layer
    if not -n <= layer < n:
        raise LfmError(
            f"layer {layer} is out of range for a {n}-layer model: give 0 … {n - 1}, "
            f"or −{n} … −1 counted from the top"
        )
    return layer % n


def edit_site(model: nn.Module, layer: int | None) -> EditSite:
    """The edit site of block `layer` (None: `default_layer`)."""
    lay, layer = get_layout(model), layer_of(model, layer)
    name = module_name(model, "mlp_out", layer)
    mod = model.get_submodule(name)
    conv1d = is_conv1d(mod)
    out_in = tuple(mod.weight.shape[::-1] if conv1d else mod.weight.shape)
    block = f"{lay.layers}.{layer}"
    norm = f"{block}.{lay.mlp_out_norm}" if lay.mlp_out_norm else None
    return EditSite(layer, block, name, (int(out_in[0]), int(out_in[1])), conv1d, norm)


def edit_sites(model: nn.Module, layers: Sequence[int]) -> list[EditSite]:
    return [edit_site(model, layer) for layer in layers]
