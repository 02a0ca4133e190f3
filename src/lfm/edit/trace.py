"""Causal tracing (Meng et al. 2022, arXiv 2202.05262, §2): where a fact is recalled.

Three runs on one prompt whose answer is token o:

  clean        p*  = P(o | prompt)
  corrupted    p₋  = P(o | prompt, subject embeddings + ε),  ε ~ N(0, ν²),  ν = 3σ
  restored     p(l, i): corrupted, except that the block-l output at token i is set to its
               clean value

The indirect effect IE(l, i) = p(l, i) − p₋, averaged over the noise samples, is the layer ×
token heat map of the paper's Fig. 1: a peak at the subject's last token in early-middle layers
is where ROME edits. σ is the standard deviation of input embeddings, estimated here on 4,096
seeded random token ids (the paper uses subject-token embeddings of its dataset).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm.core.hooks import add_at, capture, replace_at
from lfm.core.io import write_text
from lfm.core.layouts import get_layout, num_layers
from lfm.core.plot import save_png
from lfm.edit import common, progress
from lfm.edit.requests import subject_range, target_ids


@dataclass(frozen=True)
class Trace:
    """Causal-tracing result for one prompt."""

    tokens: list[str]  # the prompt's tokens, as text
    subject: tuple[int, int]  # token range [start, end) of the subject
    answer: str  # the token o whose probability is traced
    clean: float  # p*
    corrupted: float  # p₋
    effect: list[list[float]]  # (layers, tokens): mean p(l, i)

    def save(self, path: str | Path) -> Path:
        """Write the numbers as JSON, atomically."""
        return write_text(path, json.dumps(asdict(self), indent=1, ensure_ascii=False))


def noise_scale(model: nn.Module, factor: float = 3.0, n: int = 4096) -> float:
    """ν = factor · σ, σ the std of the input embeddings of n seeded random token ids."""
    embed = model.get_submodule(get_layout(model).embed)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embed.num_embeddings, (n,), generator=g)
    with torch.no_grad():
        return factor * float(embed(ids.to(embed.weight.device)).float().std())


@contextmanager
def _hooks(
    model: nn.Module, noise: torch.Tensor, span: tuple[int, int], restore: Any = None
) -> Iterator[None]:
    """Corrupt the subject embeddings with `noise` (B, S, D); optionally restore one block's
    output at one token per row: restore = (layer, tokens (B,), clean hidden (T, D))."""
    lay = get_layout(model)
    b, s = noise.shape[:2]
    rows = torch.arange(b, device=noise.device).repeat_interleave(s)  # (B·S,) row of each noise
    cols = torch.arange(*span, device=noise.device).repeat(b)  # (B·S,) its subject token
    with ExitStack() as stack:
        embed = model.get_submodule(lay.embed)
        stack.enter_context(add_at(embed, rows, cols, noise.reshape(b * s, -1)))
        if restore is not None:
            layer, toks, clean = restore
            block = model.get_submodule(f"{lay.layers}.{layer}")
            stack.enter_context(replace_at(block, torch.arange(len(toks)), toks, clean[toks]))
        yield


def _prob(model: nn.Module, ids: torch.Tensor, answer: int) -> torch.Tensor:
    logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
    return logits.softmax(-1)[:, answer]  # (B,)


@torch.no_grad()
def causal_trace(
    handle: Any,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
) -> Trace:
    """Indirect effect of each block output at each token on P(answer | prompt).

    Args:
        handle: a `LocalModel` (WEIGHTS access: the noise and the restored states go inside).
        prompt: text ending where the answer comes; `subject` must occur in it.
        answer: the traced continuation (its first token); default: the model's top prediction.
        samples: noise samples averaged (paper: 10).
        noise: ν as a multiple of the embedding std σ (paper: 3).
        seed: seed of the noise.
    """
    model, tok = common.model_and_tokenizer(handle, "edit trace")
    ids_list, start, end = subject_range(tok, prompt, subject)
    dev = next(model.parameters()).device
    ids = torch.tensor([ids_list], device=dev)  # (1, T)
    logits, blocks = _clean_run(model, ids)
    o = int(logits.argmax()) if answer is None else _first_token(tok, prompt, answer)
    clean = float(logits.float().softmax(-1)[o])
    g = torch.Generator().manual_seed(seed)
    d = blocks[0].shape[-1]
    eps = torch.randn(samples, end - start, d, generator=g) * noise_scale(model, noise)
    eps = eps.to(dev)
    with _hooks(model, eps, (start, end)):
        corrupted = float(_prob(model, ids.expand(samples, -1), o).mean())
    t = ids.shape[1]
    rows = eps.repeat(t, 1, 1)  # (t·samples, S, D): token i restored in rows i·samples…
    toks = torch.arange(t, device=dev).repeat_interleave(samples)
    effect = []
    n = num_layers(model)
    # one bar step per restored (layer, token, noise sample); a layer's are one batched pass
    with progress.bar(total=n * t * samples, desc="restorations", unit="run") as shown:
        for layer in range(n):
            with _hooks(model, rows, (start, end), (layer, toks, blocks[layer])):
                p = _prob(model, ids.expand(len(toks), -1), o).view(t, samples).mean(1)
            effect.append([float(x) for x in p])
            shown.update(t * samples)
    tokens = [tok.decode([i]) for i in ids_list]
    return Trace(tokens, (start, end), tok.decode([o]), clean, corrupted, effect)


def _clean_run(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Next-token logits (V,) and every block's output (T, D) on the uncorrupted prompt."""
    blocks = [f"{get_layout(model).layers}.{i}" for i in range(num_layers(model))]
    with capture(model, blocks) as outs:
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
    return logits, [outs[b][0] for b in blocks]


def _first_token(tokenizer: Any, prompt: str, answer: str) -> int:
    return target_ids(tokenizer, prompt, answer.strip())[0]


def figure(trace: Trace) -> Any:
    """The layer × token heat map of p(l, i) as a matplotlib figure (rows: the prompt's tokens,
    subject tokens starred; columns: layers), its colour bar labelled with what is plotted."""
    from matplotlib.figure import Figure

    grid = torch.tensor(trace.effect).T  # (tokens, layers)
    labels = [f"{t!r}*" if trace.subject[0] <= i < trace.subject[1] else repr(t)
              for i, t in enumerate(trace.tokens)]  # fmt: skip
    fig = Figure(figsize=(3 + 0.25 * grid.shape[1], 1.5 + 0.3 * grid.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="Purples", aspect="auto", vmin=trace.corrupted)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(grid.shape[1]))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("token (position; * = subject)")
    ax.set_xlabel("layer (block output restored)")
    ax.set_title(f"clean {trace.clean:.3f}, corrupted {trace.corrupted:.3f}", fontsize=9)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(f"p({trace.answer!r}) with the state restored")
    fig.tight_layout()
    return fig


def plot(trace: Trace, path: str | Path) -> Path:
    """The heat map (`figure`) as a PNG, written atomically."""
    return save_png(figure(trace), path, dpi=120)
