"""Shared plumbing of the editing methods: handles, default layers, statistics, smoke models.

Nothing here does the maths of a method; it resolves what a method is given (a `LocalModel`
handle, or a model and its tokenizer), checks the access level, and lets a method apply its own
intermediate deltas *temporarily* (restored bit for bit on exit), so computing a patch never
leaves the caller's model changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lfm.access import Access, require
from lfm.core.layouts import get_layout, num_layers
from lfm.edit.base import edits
from lfm.edit.patch import Delta, Undo, linear_weight
from lfm.edit.requests import Request
from lfm.errors import LfmError


def resolve(target: Any, tokenizer: Any, what: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a handle (access checked) or from a model plus its tokenizer."""
    if isinstance(target, nn.Module):
        if tokenizer is None:
            raise LfmError(f"{what}: pass the tokenizer with a bare model (or pass a LocalModel)")
        return target, tokenizer
    require(target, Access.WEIGHTS, what)
    return target.model, target.tokenizer


def as_requests(requests: Request | Sequence[Request] | dict | Sequence[dict]) -> list[Request]:
    """A list of validated requests from one request, dicts or a list of them."""
    items = [requests] if isinstance(requests, Request | dict) else list(requests)
    if not items:
        raise LfmError("no edit requests given")
    return [r if isinstance(r, Request) else Request.from_dict(r) for r in items]


def default_layer(model: nn.Module) -> int:
    """About one sixth of the depth: where causal tracing puts subject recall in GPT-J (5 of 28).

    SmolLM2 (30 blocks) → 5, Gemma 3 270M (18) → 3, a 2-block test model → 0.
    """
    return min(round(num_layers(model) / 6), num_layers(model) - 1)


def layer_of(model: nn.Module, layer: int | None) -> int:
    n = num_layers(model)
    layer = default_layer(model) if layer is None else layer
    if not -n <= layer < n:
        raise LfmError(f"layer {layer} is out of range for a {n}-layer model")
    return layer % n


# The δ search on layouts that norm the MLP output before the residual (Gemma 3). There the MLP
# output's scale is free (the norm undoes it) and small (‖v‖ 4–14 at the subject in Gemma 3 270M,
# against 30–50 in SmolLM2), so the paper's absolute Adam step of 0.5 overshoots; and δ searched to
# P(target) ≈ 0.95 spills onto other subjects of the same kind. Measured in docs/edit.md.
NORMED_V_LR = 0.05
PAPER_V_LR, PAPER_STOP_NLL = 0.5, 0.05


def search_defaults(cfg: Any, model: nn.Module, normed_stop_nll: float = PAPER_STOP_NLL) -> Any:
    """`cfg` with the δ search's `v_lr` and `stop_nll` filled where they are None: the paper's
    0.5 and 0.05, or, where the layout norms the MLP output (Gemma 3), `NORMED_V_LR` and
    `normed_stop_nll`."""
    normed = bool(get_layout(model).mlp_out_norm)
    lr = cfg.v_lr if cfg.v_lr is not None else (NORMED_V_LR if normed else PAPER_V_LR)
    stop = cfg.stop_nll
    if stop is None:
        stop = normed_stop_nll if normed else PAPER_STOP_NLL
    return cfg.replace(v_lr=lr, stop_nll=stop)


def covariance(model: nn.Module, tokenizer: Any, layer: int, cfg: Any, given: Any) -> torch.Tensor:
    """C at `layer`: the one given (tensor or {layer: tensor}), identity if the config turns
    covariance off, else the cached statistics (computed once)."""
    if isinstance(given, dict):
        given = given.get(layer)
    if given is not None:
        return given.double()
    if not cfg.use_cov:
        return torch.eye(linear_weight(model, _mlp_out(model, layer)).shape[1], dtype=torch.float64)
    from lfm.edit.stats import second_moment

    return second_moment(model, tokenizer, layer, *stats_args(cfg))


def stats_args(cfg: Any) -> tuple[str, int, int]:
    return cfg.stats_corpus, cfg.stats_tokens, cfg.stats_max_len


def prefetch_covariances(model: nn.Module, tokenizer: Any, layers, cfg: Any, given: Any) -> Any:
    """{layer: C}: the given statistics, else all cached/computed in one pass (if C is used)."""
    if given is not None or not cfg.use_cov:
        return given
    from lfm.edit.stats import second_moments

    return second_moments(model, tokenizer, list(layers), *stats_args(cfg))


def _mlp_out(model: nn.Module, layer: int) -> str:
    from lfm.core.layouts import module_name

    return module_name(model, "mlp_out", layer)


def solve_cov(cov: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge·tr(C)/D·I)⁻¹ rhs in float64; the tiny ridge only guards a rank-deficient C."""
    d = cov.shape[0]
    reg = cov + ridge * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
    return torch.linalg.solve(reg, rhs.double())


@contextmanager
def temporarily(model: nn.Module, deltas: Sequence[Delta]) -> Iterator[None]:
    """Apply deltas for the duration of the block; restore the exact originals after."""
    names = {d.module for d in deltas}
    undo = Undo({m: model.get_submodule(m).weight.detach().clone() for m in names})
    try:
        with torch.no_grad(), edits(model):
            for d in deltas:
                w = linear_weight(model, d.module)
                w.add_(d.matrix().to(w.dtype))
        yield
    finally:
        undo.revert(model)


# ---- tiny models for `smoke` runs (built in code; tests have their own in conftest) ----

SMOKE_TEXTS = (
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Tokyo is a large city in Japan; Kyoto is an old city.",
)


def tiny_lm(seed: int = 0, kind: str = "llama") -> tuple[nn.Module, Any]:
    """A 2-block, 32-wide causal LM and a byte-level BPE tokenizer trained on `SMOKE_TEXTS`
    (vocabulary large enough that every word with its leading space is one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<pad>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(SMOKE_TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")
    common = {"vocab_size": len(fast), "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0}
    config = (
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, **common)
        if kind == "llama"
        else GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), fast


# The subject ends the prompt: in a random 2-block model only the residual at the subject's own
# position reaches the next-token logits strongly (attention there is near uniform and small).
SMOKE_REQUEST = Request("The city of the Eiffel Tower", "Eiffel Tower", "Rome")


def smoke_cov(model: nn.Module, tokenizer: Any, layer: int) -> torch.Tensor:
    from lfm.edit.stats import compute_second_moments

    return compute_second_moments(model, tokenizer, [layer], SMOKE_TEXTS * 8, 10_000, 64)[layer]
