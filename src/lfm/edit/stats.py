"""Second-moment statistics of MLP keys: C = E[k kᵀ] (ROME, Meng et al. 2022, arXiv 2202.05262).

k is the input of the MLP output projection of one layer (the "key" of ROME's linear
associative memory view, W k ≈ v). ROME's update ΔW = (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀk*)
and MEMIT's λC term both need C estimated over generic text. We stream the BBC News training
articles (the only general English text shipped offline) through the model up to the edited
layer, with a token budget and a per-article length cap, accumulate Σ k kᵀ in float64, and cache
C under `cache_dir()/edit-stats/` keyed by a fingerprint of the weights that produce k (embeddings
and blocks 0..layer), the layer, the corpus and the budget. A cached file is never recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from lfm.assets.cache import cache_dir
from lfm.core.io import atomic_path
from lfm.core.layouts import get_layout, module_name

_console = Console(stderr=True)


class _Stop(Exception):
    """Raised by a hook once the keys of a batch are read: later layers need not run."""


def key_fingerprint(model: nn.Module, layer: int) -> str:
    """SHA-256 of the weights that determine the keys at `layer` (embeddings, blocks ≤ layer)."""
    lay = get_layout(model)
    keep = (lay.embed + ".",) + tuple(f"{lay.layers}.{i}." for i in range(layer + 1))
    h = hashlib.sha256(str(model.config.model_type).encode())
    for name, p in model.named_parameters():
        if name.startswith(keep):
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stats_path(model: nn.Module, layer: int, corpus: str, tokens: int, max_len: int) -> Path:
    fp = key_fingerprint(model, layer)[:16]
    return cache_dir() / "edit-stats" / f"{fp}-L{layer}-{corpus}-{tokens}tok-{max_len}len.safetensors"


def corpus_texts(corpus: str) -> Sequence[str]:
    """Texts of a named corpus; only `bbc-news` (its training split) ships offline."""
    from lfm.assets import load_dataset

    return load_dataset(corpus).train_texts  # type: ignore[union-attr]


@torch.no_grad()
def compute_second_moment(
    model: nn.Module, tokenizer: Any, layer: int, texts: Iterable[str], tokens: int, max_len: int
) -> torch.Tensor:
    """E[k kᵀ] over up to `tokens` tokens of `texts`, each cut to `max_len` tokens. (D, D) fp64."""
    mod = model.get_submodule(module_name(model, "mlp_out", layer))
    acc: dict[str, Any] = {"sum": None, "n": 0}

    def hook(_m: nn.Module, args: tuple) -> None:
        k = args[0].reshape(-1, args[0].shape[-1]).double()  # (T, D), batch of one: no padding
        acc["sum"] = k.T @ k if acc["sum"] is None else acc["sum"] + k.T @ k
        acc["n"] += k.shape[0]
        raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_len)
            try:
                model(input_ids=ids["input_ids"][:, : tokens - acc["n"]].to(device))
            except _Stop:
                pass
            if acc["n"] >= tokens:
                break
    finally:
        handle.remove()
    return acc["sum"] / max(acc["n"], 1)


def second_moment(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    corpus: str = "bbc-news",
    tokens: int = 100_000,
    max_len: int = 256,
    compute: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """C = E[k kᵀ] at `layer`, from the cache or computed once and cached (float64, (D, D)).

    Args:
        model: the causal LM (not changed).
        tokenizer: its tokenizer.
        layer: the block whose MLP output projection is edited.
        corpus: a text corpus name (`bbc-news`).
        tokens: token budget.
        max_len: longest sequence read from one article.
        compute: the estimator (tests substitute one); defaults to `compute_second_moment`.
    """
    path = stats_path(model, layer, corpus, tokens, max_len)
    if path.exists():
        return load_file(str(path))["mom2"]
    compute = compute or compute_second_moment
    with _console.status(f"edit statistics: E[kkᵀ] at layer {layer} over {tokens:,} tokens"):
        mom2 = compute(model, tokenizer, layer, corpus_texts(corpus), tokens, max_len)
    with atomic_path(path) as tmp:
        save_file({"mom2": mom2.contiguous()}, str(tmp), metadata={"layer": str(layer)})
    return mom2
