"""Where things live inside each supported architecture: data, not code.

A method that needs "the MLP output projection of layer 7" asks the layout for
`module(model, "mlp_out", 7)` instead of branching on the model type. Adding an architecture is
adding one entry here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lfm.errors import LfmError


@dataclass(frozen=True)
class Layout:
    layers: str  # the ModuleList of blocks
    embed: str  # input token embeddings
    final_norm: str  # norm before the LM head ("" for encoders)
    lm_head: str  # output projection ("" for encoders)
    attn_out: str  # attention output projection, relative to a block
    mlp_in: str  # first MLP projection (up / c_fc), relative to a block
    mlp_out: str  # MLP output projection (down / c_proj), relative to a block; its input is the key of ROME-style edits
    conv1d: bool = (
        False  # GPT-2 stores linear layers as Conv1D: weight is (in, out), transposed to nn.Linear
    )
    # norm between the MLP output and the residual, relative to a block ("" = none; Gemma 3 has one)
    mlp_out_norm: str = ""


LAYOUTS: dict[str, Layout] = {
    "llama": Layout("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                    "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"),
    "gemma3_text": Layout("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                          "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj",
                          mlp_out_norm="post_feedforward_layernorm"),
    "gpt2": Layout("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head",
                   "attn.c_proj", "mlp.c_fc", "mlp.c_proj", conv1d=True),
    "bert": Layout("encoder.layer", "embeddings.word_embeddings", "", "",
                   "attention.output.dense", "intermediate.dense", "output.dense"),
}  # fmt: skip
LAYOUTS["gemma3"] = LAYOUTS["gemma3_text"]
LAYOUTS["mistral"] = LAYOUTS["qwen2"] = LAYOUTS["llama"]


def get_layout(model: nn.Module) -> Layout:
    """The layout of a transformers model, by its config's model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS))
        raise LfmError(
            f"no layout for model type {model_type!r}; known: {known} (add one in lfm/core/layouts.py)"
        )
    return LAYOUTS[model_type]


def num_layers(model: nn.Module) -> int:
    blocks = model.get_submodule(get_layout(model).layers)
    return len(blocks) if isinstance(blocks, nn.ModuleList) else sum(1 for _ in blocks.children())


def module_name(model: nn.Module, part: str, layer: int) -> str:
    """Full name of a per-block part (`attn_out`, `mlp_in`, `mlp_out`) in block `layer`."""
    lay = get_layout(model)
    n = num_layers(model)
    if not -n <= layer < n:
        raise LfmError(f"layer {layer} is out of range for a {n}-layer model")
    return f"{lay.layers}.{layer % n}.{getattr(lay, part)}"


def module(model: nn.Module, part: str, layer: int) -> nn.Module:
    return model.get_submodule(module_name(model, part, layer))


def block_of(name: str, layers: str) -> int | None:
    """The block a module name sits in ("model.layers.5.mlp" under "model.layers": 5), or None
    for a module outside the blocks."""
    if not name.startswith(layers + "."):
        return None
    return int(name[len(layers) + 1 :].split(".")[0])


def layout_of(model: nn.Module) -> dict[str, Any]:
    """A printable summary of where layers and projections are, or {} for unknown models."""
    try:
        lay = get_layout(model)
    except LfmError:
        return {}
    n = num_layers(model)
    out = {k: v for k, v in asdict(lay).items() if v != ""}
    out["num_layers"] = n
    out["block"] = f"{lay.layers}.{{0..{n - 1}}}"
    return out
