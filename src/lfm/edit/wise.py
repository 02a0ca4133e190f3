"""WISE: lifelong editing in a side memory behind a router (Wang et al. 2024, arXiv 2405.14768).

WISE keeps the model's weights as its *main memory* and writes every edit into a *side memory*:
a copy W_v' of the value matrix W_v (the MLP output projection) of one block, about 3/4 up the
model. At inference a router chooses, per sequence, which of the two produces that layer's
output. With a the projection's input at token t (D_in), the routing score is

    Δ_act(a) = ‖(W_v' − W_v) a‖₂,       side memory iff  max_t Δ_act(a_t) > ε,

the maximum taken over the sequence's real tokens (not its padding). Sequences that stay below ε
get the main memory's output bit for bit; the weights are never changed.

An edit trains W_v' (SGD, at most `steps`; each entry of W_v' − W_v kept within ±`clamp`) on the
target's NLL with the side memory in place at every position, plus the paper's routing loss on
the edit prompt x_e and a few irrelevant texts x_i (each score the maximum over its tokens):

    L_a = max(0, Δ(x_i) − α) + max(0, β − Δ(x_e)) + max(0, γ − (Δ(x_e) − Δ(x_i))),

averaged over the x_i. A request carries no neighbourhood prompts (and a benchmark scores those),
so the x_i are generic sentences (`IRRELEVANT`, the config's `irrelevant`).

Two options follow the authors' released code rather than the paper's text (both off by
default): `routing="subject"` takes the edit's score in L_a over the subject's tokens only and
adds the prompt's other tokens to the x_i, so that the router learns to fire on the subject and
not on the words of its template (which a neighbouring fact of the same relation shares);
`n_prefixes` trains the target NLL on the prompt behind fixed context prefixes as well
(`locate.PREFIXES`, as ROME does; the authors' code uses 10 model-written ones).

Knowledge sharding: the side memory's edits are spread over shards of `shard_size` edits; each
shard starts as a copy of W_v and edits only a random mask of density ρ (0.2) of its entries,
τ_i = (W_v'^i − W_v) ⊙ M_i. The side memory is their TIES merge (Yadav et al. 2023, arXiv
2306.01708), W_v' = W_v + TIES(τ_1, …, τ_k): trim each τ_i to its top `merge_density` of
magnitudes, elect a sign per entry by the summed mass, average the agreeing entries (written
here, in `ties_merge`: an area may not import `lfm.reuse`). One shard is returned as it is.
WISE-Retrieve, the paper's variant (`shards_per_memory`): every k shards are merged into a side
memory of their own, each with its ε, and a query goes to the memory it scores highest on when
that score exceeds the memory's ε (`retrieve`).

ε: the paper takes it from the minimum routing score over the edited prompts; here, after every
edit, ε = `act_ratio` · min_e max_t Δ_act(a_{e,t}) under the merged memory, from the projection
inputs of every edited prompt, kept in the memory (they do not depend on the side memory, which
sits at the projection's output). Sequential edits grow one memory (`wise(..., memory=m)`;
`lfm edit apply -m wise --state FILE` carries it across runs).

Defaults are the authors' published settings for 7B models: lr 1.0, 70 steps, clamp 1.0, ρ 0.2,
α, β, γ = 5, 20, 10, ε scale 0.88, TIES density 0.53, 500 edits a shard. On SmolLM2 (projection
inputs ~20 long) lr 1.0 oversteps the routing loss; docs/edit.md measures lr 0.1 beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from lfm.access import Access, narrow
from lfm.config import Config
from lfm.core.hooks import capture, frozen, hooked, replay_below, stop_after
from lfm.core.io import load_tensors, save_tensors
from lfm.core.layouts import num_layers
from lfm.edit import common, locate, progress
from lfm.edit.contract import EDITOR
from lfm.edit.patch import check_module, fingerprint
from lfm.edit.requests import Request, build_batch, subject_range
from lfm.edit.site import EditSite, edit_site
from lfm.errors import LfmError
from lfm.registry import Example, register

FORMAT = "lfm-edit-wise/1"
PAPER = "Wang et al. 2024, arXiv 2405.14768 (WISE)"

# Unrelated sentences whose routing score the editing loss keeps below α (no fact, no template
# of the packaged fact sets; several open with "The", as many edit prompts do).
IRRELEVANT: tuple[str, ...] = (
    "The weather was mild for most of the week.",
    "She opened the book and began to read.",
    "The meeting was moved to Thursday afternoon.",
    "Water boils when it is heated long enough.",
    "He plays the guitar in a small band.",
    "The children walked to school together.",
)


class WiseConfig(Config):
    # block whose MLP output projection gets the side memory; None = ⌊0.75·L⌋ (`default_layer`)
    layer: int | None = None
    density: float = Field(0.2, gt=0, le=1)  # ρ, share of entries a shard may edit (paper: 0.2)
    shard_size: int = Field(500, ge=1)  # edits per shard (authors: 500, two per 1,000 edits)
    lr: float = Field(1.0, gt=0)  # SGD step on the side memory (paper: 1.0)
    steps: int = Field(70, ge=1)  # SGD steps per edit at most (paper: 70)
    clamp: float = Field(1.0, gt=0)  # |entry of W_v' − W_v| ≤ clamp (the norm constraint: 1.0)
    alpha: float = Field(5.0, ge=0)  # α, irrelevant texts' score kept below it (paper: 5)
    beta: float = Field(20.0, gt=0)  # β, the edit's score pushed above it (paper: 20)
    gamma: float = Field(10.0, ge=0)  # γ, least gap edit − irrelevant (paper: 10)
    act_ratio: float = Field(0.88, gt=0, le=1)  # ε = act_ratio · least edit score (authors: 0.88)
    merge_density: float = Field(0.53, gt=0, le=1)  # TIES: share of a shard kept (authors: 0.53)
    stop_nll: float = Field(0.05, ge=0)  # stop once the NLL is below this and every margin holds
    irrelevant: tuple[str, ...] = Field(IRRELEVANT, min_length=1)  # the x_i of the routing loss
    # what the edit's routing score is taken over in L_a: "prompt", every token of the edit
    # prompt (the paper); "subject", the subject's tokens, the prompt's other tokens joining the
    # x_i (the authors' code for requests that name a subject)
    routing: Literal["prompt", "subject"] = "prompt"
    # rows of the target NLL: the bare prompt and the first n − 1 fixed context prefixes
    # (`locate.PREFIXES`; the authors' code trains on the bare prompt and 10 prefixes)
    n_prefixes: int = Field(1, ge=1, le=len(locate.PREFIXES))
    # the first `sink` tokens of every sequence neither count in its routing score nor get the
    # side memory (0: every token, the paper). From about block 25 of SmolLM2 on, the first
    # token's projection input is 30-60x longer than the others' whatever the text (the
    # attention sink's massive activation), so a score over all tokens is that token's
    sink: int = Field(0, ge=0)
    # WISE-Retrieve: every `shards_per_memory` shards are merged into a side memory of their
    # own, and a query gets the one with the highest routing score (None: all shards in one
    # side memory, the paper's WISE)
    shards_per_memory: int | None = Field(None, ge=1)
    seed: int = 0  # the shards' random masks

    @model_validator(mode="after")
    def _margins(self) -> Self:
        if not self.alpha < self.beta:
            raise ValueError(f"alpha ({self.alpha}) must be below beta ({self.beta})")
        return self


def default_layer(model: nn.Module) -> int:
    """⌊0.75·L⌋ (always below L), a mid-to-late block as in the paper: 22 of SmolLM2's 30, 1 of
    a 2-block model."""
    return int(0.75 * num_layers(model))


@dataclass
class Shard:
    """One subspace of the side memory: mask M (D_out, D_in) bool, τ = (W_v' − W_v) ⊙ M, edits."""

    mask: torch.Tensor
    delta: torch.Tensor
    edits: int = 0


def new_shard(shape: tuple[int, int], density: float, seed: int, index: int) -> Shard:
    """An empty shard whose mask draws each entry with probability ρ: `torch.rand` from a
    generator seeded with seed · 1,000,003 + index, so a run's masks are reproducible."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return Shard(torch.rand(shape, generator=gen) < density, torch.zeros(shape))


def masked(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """τ ⊙ M: the entries a shard may change (gradients outside the mask are zero)."""
    return delta * mask


def ties_merge(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES over shard deltas: trim each to its top `density` magnitudes (ties at the threshold
    kept), elect the sign of the summed mass, average the entries that agree with it."""
    if len(deltas) == 1:
        return deltas[0].clone()
    trimmed = []
    for d in deltas:
        k = max(1, math.ceil(density * d.numel()))
        cut = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)  # (k, D_out, D_in)
    sign = stack.sum(0).sign()
    agree = (stack.sign() == sign) & (stack != 0)
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def scores(delta: torch.Tensor, acts: Sequence[torch.Tensor]) -> torch.Tensor:
    """max_t ‖Δ a_t‖ per text, from each text's projection inputs (T_i, D_in) → (n,)."""
    return torch.stack([F.linear(a, delta).norm(dim=-1).amax() for a in acts])


def past_sink(a: torch.Tensor, sink: int) -> torch.Tensor:
    """A text's projection inputs (T, D_in) less its first `sink` tokens (all of them when it
    has no more than `sink`): the tokens that count in its routing score."""
    return a[sink:] if 0 < sink < a.shape[0] else a


def sink_free(mask: torch.Tensor, sink: int) -> torch.Tensor:
    """(B, T) bool: the real tokens of each row (`mask` (B, T), 1 = real) after its first `sink`
    real ones; a row with no more than `sink` real tokens keeps them all (as `past_sink`)."""
    real = mask.bool()
    order = real.long().cumsum(-1)  # 1 at the first real token, 2 at the second, ...
    short = real.sum(-1, keepdim=True) <= sink
    return real & ((order > sink) | short)


def routing_loss(edit: torch.Tensor, irrelevant: torch.Tensor, cfg: WiseConfig) -> torch.Tensor:
    """L_a for one edit's score and the irrelevant texts' scores (n,), averaged over those."""
    return (
        F.relu(irrelevant - cfg.alpha).mean()
        + F.relu(cfg.beta - edit)
        + F.relu(cfg.gamma - (edit - irrelevant)).mean()
    )


def activations(model: nn.Module, tok: Any, texts: Sequence[str], site: EditSite) -> list:
    """The projection's input at every token of each text, (T_i, D_in) float on the CPU (one
    pass per text, stopped at the projection)."""
    with torch.no_grad():
        dev, out = next(model.parameters()).device, []
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]], device=dev)
            with (
                capture(model, [site.module], inputs=True) as ins,
                stop_after(model, [site.module]) as run,
            ):
                run(lambda ids=ids: model(input_ids=ids))
            out.append(ins[site.module][0].float().cpu())
        return out


def routing_inputs(
    tok: Any, req: Request, prompt: torch.Tensor, irrelevant: list[torch.Tensor],
    cfg: WiseConfig,
) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """The projection inputs whose scores L_a pushes up (the edit's) and keeps down (the x_i),
    from the edit prompt's (`prompt`, (T, D_in)) and the irrelevant texts'. `cfg.routing`
    "prompt": all of the prompt against the x_i; "subject": the subject's tokens against the
    x_i and the prompt's other tokens (one more text, when there are any)."""
    if cfg.sink:
        irrelevant = [past_sink(a, cfg.sink) for a in irrelevant]
    if cfg.routing == "prompt":
        return past_sink(prompt, cfg.sink), irrelevant
    _, start, end = subject_range(tok, req.prompt, req.subject)
    skip = len(prompt) - len(past_sink(prompt, cfg.sink))  # the sink's tokens, left out
    start = max(start, skip)
    if start >= end:  # the subject is all sink: score the prompt's other tokens
        return prompt[skip:], irrelevant
    rest = torch.cat([prompt[skip:start], prompt[end:]])
    return prompt[start:end], [*irrelevant, rest] if len(rest) else irrelevant


def train_edit(
    model: nn.Module, tok: Any, req: Request, site: EditSite, shard: Shard,
    acts: tuple[torch.Tensor, list[torch.Tensor]], cfg: WiseConfig,
) -> dict[str, float]:  # fmt: skip
    """Train the shard's τ (inside its mask) for one edit: NLL with W_v + τ in place plus L_a.
    `acts`: the projection inputs whose score L_a raises (the edit's) and those it keeps low
    (the irrelevant texts', `routing_inputs`). Updates the shard."""
    batch = build_batch(tok, req, locate.prefixes(cfg.n_prefixes))
    tau = shard.delta.clone().requires_grad_(True)
    opt = torch.optim.SGD([tau], lr=cfg.lr)
    # the tokens that get the side memory (all but each row's first `cfg.sink`), (B, T, 1)
    gets = sink_free(batch.attention_mask, cfg.sink)[..., None] if cfg.sink else None

    def side(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        d = F.linear(args[0].float(), masked(tau, shard.mask))
        if gets is not None:
            d = d * gets.to(d.device, d.dtype)
        return out + d.to(out.dtype)

    below = replay_below(model, site.block, lambda: locate._target_nll(model, batch))
    with below:  # the blocks under the side memory run once, not at every step
        trace = _descend(model, batch, site, side, tau, opt, shard, acts, cfg)
    shard.delta = masked(tau, shard.mask).detach()
    shard.edits += 1
    return trace


def _descend(
    model: nn.Module, batch: Any, site: EditSite, side: Any, tau: torch.Tensor,
    opt: torch.optim.Optimizer, shard: Shard, acts: tuple[torch.Tensor, list[torch.Tensor]],
    cfg: WiseConfig,
) -> dict[str, float]:  # fmt: skip
    """SGD on τ until the target NLL is below `stop_nll` with every routing margin met."""
    trace: dict[str, float] = {}
    for step in range(cfg.steps):
        with hooked([(site.projection(model), side)]):
            nll = locate._target_nll(model, batch)
        delta = masked(tau, shard.mask)
        edit, irr = scores(delta, [acts[0]])[0], scores(delta, acts[1])
        route = routing_loss(edit, irr, cfg)
        trace.setdefault("nll_start", nll.item())
        trace.update(nll_end=nll.item(), routing=route.item(), score=edit.item(), steps=step)
        if nll.item() < cfg.stop_nll and route.item() == 0:
            break
        opt.zero_grad()
        (nll + route).backward()
        opt.step()
        with torch.no_grad():
            tau.clamp_(-cfg.clamp, cfg.clamp)
    return trace


def groups(shards: Sequence[Shard], per_memory: int | None) -> list[range]:
    """The shards of each side memory: all in one (None), else `per_memory` at a time."""
    step = per_memory or max(1, len(shards))
    return [range(i, min(i + step, len(shards))) for i in range(0, len(shards), step)]


def consolidate(
    shards: Sequence[Shard], acts: Sequence[torch.Tensor], cfg: WiseConfig
) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """Each side memory's delta W_v' − W_v (the TIES merge of its shards), its ε and every
    edit's routing score under its own memory. An edit belongs to the shard it was trained
    in (the shards hold their edits in order)."""
    owner = [i for i, s in enumerate(shards) for _ in range(s.edits)]
    sides, eps, each = [], [], [0.0] * len(acts)
    for group in groups(shards, cfg.shards_per_memory):
        side = ties_merge([shards[i].delta for i in group], cfg.merge_density)
        mine = [e for e, i in enumerate(owner) if i in group]
        got = scores(side, [past_sink(acts[e], cfg.sink) for e in mine])
        for e, x in zip(mine, got.tolist(), strict=True):
            each[e] = x
        sides.append(side)
        eps.append(cfg.act_ratio * float(got.min()))
    return sides, eps, each


def _best(
    side: torch.Tensor, a: torch.Tensor, real: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Under one side memory: its output Δ a (B, T, D_out) and each row's routing score, the
    largest ‖Δ a_t‖ over the tokens `real` marks (B, T; None: all), (B,)."""
    d = F.linear(a.float(), side.to(a.device))
    score = d.norm(dim=-1)  # (B, T)
    if real is not None:  # padding (and the sink) never route a sequence
        score = score * real.to(score.dtype)
    return d, score.amax(-1)


def retrieve(
    sides: Sequence[torch.Tensor], eps: Sequence[float], a: torch.Tensor, out: torch.Tensor,
    mask: torch.Tensor | None, before: tuple[torch.Tensor, torch.Tensor] | None = None,
    sink: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The projection's output `out` (B, T, D_out) with, on every routed row, the side memory
    whose routing score is the highest for it (WISE-Retrieve; with one memory, WISE's routing);
    which rows were routed (B,) and to which memory (B,).

    A row's score under a memory is the largest ‖Δ a_t‖ over its real tokens (`mask` (B, T),
    None: all) past its first `sink` ones; it is routed to its best memory j when that score
    exceeds ε_j, or when `before` = (routed, memory) of the same cached generation routed it
    (to that memory again). The other rows are returned bit for bit (`torch.where`). `a`: the
    input (B, T, D_in). `sink`: each row's first `sink` real tokens are left out of the score
    and get the main memory's output (`WiseConfig.sink`; the caller passes 0 for a call that
    continues a cached generation, whose tokens are not the sequence's first)."""
    real = mask if mask is not None and mask.shape == out.shape[:2] else None
    if sink:
        real = sink_free(
            torch.ones(out.shape[:2], device=out.device) if real is None else real, sink
        )
    d, top = _best(sides[0], a, real)
    which = torch.zeros_like(top, dtype=torch.long)
    if len(sides) > 1:  # keep only each row's best score, then compute its memory's output
        top, which = torch.stack([top, *(_best(s, a, real)[1] for s in sides[1:])]).max(0)
    routed = top > torch.tensor(eps, dtype=top.dtype, device=top.device)[which]
    if before is not None and before[0].shape == routed.shape:
        was, where = before[0].to(routed.device), before[1].to(which.device)
        routed, which = routed | was, torch.where(was, where, which)
    if len(sides) > 1:
        d = torch.zeros_like(d)
        for j in which[routed].unique().tolist():
            rows = routed & (which == j)
            d[rows] = F.linear(a[rows].float(), sides[j].to(a.device))
    if sink and real is not None:  # the sink's tokens keep the main memory's output
        d = d * real[..., None].to(d.dtype)
    return torch.where(routed[:, None, None], out + d.to(out.dtype), out), routed, which


def route(
    side: torch.Tensor, eps: float, a: torch.Tensor, out: torch.Tensor,
    mask: torch.Tensor | None, before: torch.Tensor | None = None, sink: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """WISE's routing with one side memory `side` = W_v' − W_v and its ε (`retrieve` with one
    memory): the output and which rows were routed (B,); `before`, the rows an earlier call of
    the same cached generation routed."""
    prior = None if before is None else (before, torch.zeros(before.shape, dtype=torch.long))
    new, routed, _ = retrieve([side], [eps], a, out, mask, prior, sink)
    return new, routed


def _call_state(kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, bool]:
    """The attention mask a model call was given (2-D only) and whether it continues a cached
    generation (its cache already holds tokens). transformers 5's `generate` passes the cache
    as `cache`; a direct call may still pass `past_key_values`."""
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    past = kwargs.get("cache")
    past = kwargs.get("past_key_values") if past is None else past
    length = getattr(past, "get_seq_length", None)
    return mask, bool(past is not None and (length() if length else len(past)) > 0)


@dataclass
class WiseUndo:
    """The installed hooks; `revert` removes them (no weight was changed)."""

    handles: list[Any]

    def revert(self, model: nn.Module | None = None) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class WiseMemory:
    """WISE's side memories at one module: the shards, the edited prompts' projection inputs,
    each side memory's merged delta and ε (one memory unless `shards_per_memory` is set: then
    WISE-Retrieve), the requests it holds and the fingerprint of the main memory."""

    module: str
    shards: list[Shard]
    acts: list[torch.Tensor]  # per edit (T_e, D_in)
    requests: list[Request]
    config: dict[str, Any]
    base: str
    info: dict[str, Any] = field(default_factory=dict)
    method: str = "wise"
    sides: list[torch.Tensor] = field(init=False)  # each side memory's merged W_v' − W_v
    epsilons: list[float] = field(init=False)  # each side memory's ε
    edit_scores: list[float] = field(init=False)  # each edited prompt's score under its memory
    sink: int = field(init=False)  # leading tokens that neither route nor get the side memory

    def __post_init__(self) -> None:
        cfg = WiseConfig.build(self.config)
        self.sides, self.epsilons, self.edit_scores = consolidate(self.shards, self.acts, cfg)
        self.sink = cfg.sink

    @property
    def side(self) -> torch.Tensor:
        """The side memory's W_v' − W_v (WISE's one memory; WISE-Retrieve has `sides`)."""
        return self._one(self.sides)

    @property
    def epsilon(self) -> float:
        """The side memory's ε (WISE's one memory; WISE-Retrieve has `epsilons`)."""
        return self._one(self.epsilons)

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._one(self.epsilons)
        self.epsilons = [float(value)]

    def _one(self, items: list) -> Any:
        if len(items) != 1:
            raise LfmError(f"this WISE memory has {len(items)} side memories (shards_per_memory)")
        return items[0]

    @property
    def modules(self) -> list[str]:
        return [self.module]

    def check(self, model: nn.Module) -> None:
        """Raise a one-line `LfmError` unless `model` is the one this memory was made for."""
        check_module(model, self.module, self.base, "WISE memory sits at", "WISE memory")

    def routed(self, acts: Sequence[torch.Tensor]) -> list[int | None]:
        """For texts' projection inputs (T_i, D_in), the side memory the router sends each to
        (None: the main memory), as `retrieve` decides at inference."""
        got = []
        for a in acts:
            a = a[None]
            out = torch.zeros(1, a.shape[1], self.sides[0].shape[0])
            _, routed, which = retrieve(self.sides, self.epsilons, a, out, None, None, self.sink)
            got.append(int(which[0]) if bool(routed[0]) else None)
        return got

    def apply(self, model: nn.Module) -> WiseUndo:
        """Install the router: a pre-hook on the model reads each call's attention mask, a
        forward hook on the projection routes; `undo.revert(model)` removes both."""
        self.check(model)
        call: dict[str, Any] = {}

        def pre(_m: nn.Module, _args: tuple, kwargs: dict) -> None:
            call["mask"], call["continues"] = _call_state(kwargs)

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            mask = call.get("mask")
            mask = mask[:, -out.shape[1] :] if mask is not None else None
            before = call.get("routed") if call.get("continues") else None
            sink = 0 if call.get("continues") else self.sink  # a cached call's tokens come later
            out, *routed = retrieve(self.sides, self.epsilons, args[0], out, mask, before, sink)
            call["routed"] = tuple(routed)
            return out

        return WiseUndo([
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.get_submodule(self.module).register_forward_hook(hook),
        ])  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (shards and prompt inputs + JSON metadata, tagged `FORMAT`)."""
        tensors = {f"acts.{i}": a for i, a in enumerate(self.acts)}
        for i, s in enumerate(self.shards):
            tensors[f"mask.{i}"], tensors[f"delta.{i}"] = s.mask, s.delta
        return save_tensors(
            path, tensors, FORMAT, module=self.module, method=self.method, base=self.base,
            config=self.config, requests=[r.to_dict() for r in self.requests], info=self.info,
            edits=[s.edits for s in self.shards],
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> WiseMemory:
        """Read a memory written by `save`; a one-line `LfmError` for any other file."""
        t, meta = load_tensors(path, FORMAT)
        try:
            shards = [Shard(t[f"mask.{i}"], t[f"delta.{i}"], int(n))
                      for i, n in enumerate(meta["edits"])]  # fmt: skip
            reqs = [Request.from_dict(r) for r in meta["requests"]]
            acts = [t[f"acts.{i}"] for i in range(len(reqs))]
            return cls(str(meta["module"]), shards, acts, reqs, meta["config"],
                       str(meta["base"]), meta["info"], str(meta["method"]))  # fmt: skip
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise LfmError(f"{path} is not a complete {FORMAT} file ({type(e).__name__})") from None


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    """One request on a tiny Llama; margins on the scale of its ~0.05-long projection inputs."""
    lm = common.smoke_model("llama", seed)
    cfg = WiseConfig(steps=10, alpha=0.05, beta=0.5, gamma=0.25)
    return Example(
        (narrow(lm, level), common.SMOKE_REQUEST), {}, cfg,
        lambda m: {"side": m.side, "epsilon": m.epsilon},
    )  # fmt: skip


# pragma: no mutate end


def wise_step(
    handle: Any,
    requests: Request | Sequence[Request],
    memory: WiseMemory | None = None,
    cfg: WiseConfig | None = None,
) -> tuple[WiseMemory, WiseMemory]:
    """WISE's edits of `requests`, one after another, into `memory` (None: a new one); the
    memory is both the patch and the state carried to the next call (`--state`).

    Args:
        handle: a `LocalModel` (WEIGHTS access: it reads activations and trains the side memory).
        requests: the edits, in order; each sees the shards of those before it.
        memory: an earlier memory for this model to continue (it is not changed).
        cfg: the configuration (paper defaults).
    """
    model, tok = common.model_and_tokenizer(handle, "edit/wise")
    cfg, reqs = cfg or WiseConfig(), common.as_requests(requests)
    site = edit_site(model, default_layer(model) if cfg.layer is None else cfg.layer)
    if memory is not None:
        memory.check(model)
        if memory.module != site.module:
            raise LfmError(
                f"the earlier memory sits at {memory.module}, this config's at {site.module}"
            )
    shards = [Shard(s.mask, s.delta, s.edits) for s in (memory.shards if memory else [])]
    acts, steps = list(memory.acts if memory else []), []
    with frozen(model):
        irrelevant = activations(model, tok, cfg.irrelevant, site)
        for req in progress.each(reqs):
            if not shards or shards[-1].edits >= cfg.shard_size:
                shards.append(new_shard(site.shape, cfg.density, cfg.seed, len(shards)))
            acts.append(activations(model, tok, [req.prompt], site)[0])
            routing = routing_inputs(tok, req, acts[-1], irrelevant, cfg)
            steps.append(train_edit(model, tok, req, site, shards[-1], routing, cfg))
    earlier = memory.requests if memory else []
    info = {
        "layer": site.layer,
        "steps": [*(memory.info.get("steps", []) if memory else []), *steps],
    }
    out = WiseMemory(site.module, shards, acts, [*earlier, *reqs], cfg.to_dict(),
                     fingerprint(model, [site.module]), info)  # fmt: skip
    return out, out


def wise(
    handle: Any,
    requests: Request | Sequence[Request],
    cfg: WiseConfig | None = None,
    *,
    memory: WiseMemory | None = None,
) -> WiseMemory:
    """A WISE side memory for the requests, edited one after another (the model is unchanged).

    Args:
        handle: a `LocalModel` (WEIGHTS access).
        requests: the edits, in order.
        cfg: the configuration (paper defaults).
        memory: an earlier WISE memory for this model to grow (lifelong editing); the result
            holds its shards and requests, then the new ones.
    """
    return wise_step(handle, requests, memory, cfg)[0]


wise = register(
    "edit", "wise", shape=EDITOR, branch="memory-based", access=Access.WEIGHTS,
    config=WiseConfig, paper=PAPER, example=_example,
    cli="lfm edit apply -m wise --state FILE (one side memory grows across calls; "
    "`lfm edit eval` applies it)",
)(wise)  # fmt: skip
