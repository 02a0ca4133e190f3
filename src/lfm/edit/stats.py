"""Second-moment statistics of MLP keys: C = E[k kᵀ] (ROME, Meng et al. 2022, arXiv 2202.05262).

k is the input of the MLP output projection of one layer (the "key" of ROME's linear
associative memory view, W k ≈ v). ROME's update ΔW = (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀk*)
and MEMIT's λC term both need C estimated over generic text. We stream the BBC News training
articles (the only general English text shipped offline) through the model up to the edited
layer, with a token budget and a per-article length cap, accumulate Σ k kᵀ in float64, and cache
C under `cache_dir()/edit-stats/` keyed by a fingerprint of the weights that produce k (embeddings,
blocks 0..layer−1 and block `layer` below its MLP output projection; computed once per loaded
model and kept across edits, `lfm.edit.base`), the layer, the corpus and the budget (`lfm.core.cache`, kind `edit-stats`). A cached entry is
recomputed only when it fails its checks: its parameters, sizes and hashes, then a (D, D) matrix
of finite values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm.core import cache
from lfm.core.hooks import capture, stop_after
from lfm.core.io import load_tensors, nonfinite, save_tensors
from lfm.edit import base, progress
from lfm.edit.site import edit_sites
from lfm.errors import LfmError

FORMAT = "lfm-edit-stats/1"


def key_fingerprint(model: nn.Module, layer: int) -> str:
    """SHA-256 of the base weights that determine the keys at `layer` (see `lfm.edit.base`)."""
    return base.key_fingerprints(model)[layer]


KIND = "edit-stats"
FILE = "mom2.safetensors"


def stats_key(model: nn.Module, layer: int, corpus: str, tokens: int, max_len: int) -> str:
    """The name of the cache entry of C at `layer` (see `lfm.core.cache`)."""
    fp = key_fingerprint(model, layer)[:16]
    return f"{fp}-L{layer}-{corpus}-{tokens}tok-{max_len}len"


def stats_path(model: nn.Module, layer: int, corpus: str, tokens: int, max_len: int) -> Path:
    """The cache entry's folder (it holds `FILE` and the entry's marker)."""
    return cache.entry_dir(KIND, stats_key(model, layer, corpus, tokens, max_len))


def _params(model: nn.Module, layer: int, corpus: str, tokens: int, max_len: int) -> dict:
    fp = key_fingerprint(model, layer)
    return {"format": FORMAT, "fingerprint": fp, "layer": layer, "corpus": corpus,
            "tokens": tokens, "max_len": max_len}  # fmt: skip


def corpus_texts(corpus: str) -> Sequence[str]:
    """Texts of a named corpus; only `bbc-news` (its training split) ships offline."""
    from lfm.assets import load_dataset

    return load_dataset(corpus).train_texts  # type: ignore[union-attr]


def compute_second_moments(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    texts: Iterable[str],
    tokens: int,
    max_len: int,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] at each layer over up to `tokens` tokens of `texts` (articles cut to `max_len`),
    one pass per text that stops after the deepest layer's projection. {layer: (D, D) float64}.

    A tqdm bar over the tokens read is shown while progress is reported (`lfm.edit.progress`)."""
    with torch.no_grad():
        names = {s.layer: s.module for s in edit_sites(model, layers)}
        sums: dict[int, torch.Tensor] = {}
        seen = 0
        device = next(model.parameters()).device
        with (
            capture(model, list(names.values()), inputs=True) as keys,
            stop_after(model, [names[max(layers)]]) as run,
            progress.bar(total=tokens, desc="statistics", unit="tok") as shown,
        ):
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_len)
                ids = ids["input_ids"][:, : tokens - seen].to(device)
                run(lambda ids=ids: model(input_ids=ids))
                for layer, name in names.items():
                    k = keys[name].reshape(-1, keys[name].shape[-1]).double()  # (T, D); one text
                    if layer not in sums:
                        sums[layer] = k.new_zeros(k.shape[1], k.shape[1])
                    sums[layer].addmm_(k.T, k)  # in place: no (D, D) temporary per text
                seen += ids.shape[1]
                shown.update(ids.shape[1])
                if seen >= tokens:
                    break
        return {layer: sums[layer] / max(seen, 1) for layer in layers}


def _read(folder: Path) -> torch.Tensor:
    return load_tensors(folder / FILE, FORMAT)[0]["mom2"]


def _checker(d: int) -> cache.Check:
    """`check(folder)`: the entry holds one (d, d) matrix of finite values."""

    def check(folder: Path) -> None:
        try:
            mom2 = _read(folder)
        except (LfmError, KeyError) as e:
            raise cache.BadEntry(str(e)) from None
        if tuple(mom2.shape) != (d, d):
            raise cache.BadEntry(f"C has shape {tuple(mom2.shape)}, not {(d, d)}")
        if nonfinite(mom2):
            raise cache.BadEntry("C holds NaN or infinite values")

    return check


def second_moments(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    corpus: str = "bbc-news",
    tokens: int = 100_000,
    max_len: int = 256,
    compute: Callable[..., dict[int, torch.Tensor]] | None = None,
) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] per layer, from the cache or computed once (one pass for all missing layers).

    Args:
        model: the causal LM (not changed).
        tokenizer: its tokenizer.
        layers: the blocks whose MLP output projections are edited.
        corpus: a text corpus name (`bbc-news`).
        tokens: token budget.
        max_len: longest sequence read from one article.
        compute: the estimator (tests substitute one); defaults to `compute_second_moments`.
    """
    args = (corpus, tokens, max_len)
    keys = {layer: stats_key(model, layer, *args) for layer in layers}
    params = {layer: _params(model, layer, *args) for layer in layers}
    checks = {s.layer: _checker(s.d_in) for s in edit_sites(model, layers)}
    found = {layer: cache.read(KIND, keys[layer], params[layer], checks[layer]) for layer in layers}
    out = {layer: _read(p) for layer, p in found.items() if p is not None}
    missing = sorted(set(layers) - set(out))
    if out:
        progress.say(f"statistics: cached for layer(s) {', '.join(map(str, sorted(out)))}")
    if not missing:
        return out
    compute = compute or compute_second_moments
    progress.say(f"statistics: computing E[kkᵀ] at layer(s) {', '.join(map(str, missing))} "
                 f"over {tokens:,} tokens of {corpus} (once; cached after)")  # fmt: skip
    new = compute(model, tokenizer, missing, corpus_texts(corpus), tokens, max_len)
    for layer, mom2 in new.items():
        meta = {"layer": layer, "corpus": corpus, "tokens": tokens, "max_len": max_len}

        def build(folder: Path, mom2: torch.Tensor = mom2, meta: dict = meta) -> None:
            save_tensors(folder / FILE, {"mom2": mom2}, FORMAT, **meta)

        folder = cache.write(KIND, keys[layer], params[layer], build, check=checks[layer])
        new[layer] = _read(folder)  # the entry in place: ours, or another process's
    return {**out, **new}


def second_moment(model: nn.Module, tokenizer: Any, layer: int, *args: Any, **kw: Any):
    """C at one layer (see `second_moments`)."""
    return second_moments(model, tokenizer, [layer], *args, **kw)[layer]
