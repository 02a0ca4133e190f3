"""Black-Box Tuning (BBT; Sun et al. 2022, arXiv 2201.03514): derivative-free soft-prompt search.

A soft prompt of n tokens is never optimised directly; CMA-ES searches a low-dimensional z ∈ R^d
that a fixed random projection A maps into prompt space,

    p = A z,  A ∈ R^{(n·D) × d},  A_ij ~ N(0, σ̂ / (√d · σ_z)),
    z* = argmin_z  L(f([p; E(x)]), y),

where E(x) are the input embeddings of the templated text, f the served model's logits at the last
position, L the cross-entropy over the label words, σ̂ the std of the model's input embeddings and
σ_z the CMA-ES step size. One objective value is one API call on the whole few-shot train set. It
needs only EMBEDDINGS access (`embed` + `logits_from_embeds`). BBTv2 (deep prompts at every layer)
needs hidden-state writes that no served level gives, so it is left out.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cma
import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from lfm.access import Access, EmbeddingsModel, require
from lfm.config import Config
from lfm.core.io import load_tensors, save_tensors
from lfm.errors import BudgetExceeded
from lfm.registry import register
from lfm.tuning.contract import TUNER
from lfm.tuning.replay import ReplayLog, vector_hash
from lfm.tuning.results import TuneResult
from lfm.tuning.tasks import TextClassification, Verbalizer
from lfm.tuning.tiny import example
from lfm.tuning.trainer import data_kind


class BBTConfig(Config):
    n_tokens: int = Field(50, ge=1)  # soft-prompt length n (paper: 50)
    intrinsic_dim: int = Field(500, ge=1)  # d, the dimension CMA-ES searches (paper: 500)
    popsize: int = Field(20, ge=2)  # CMA-ES population (paper: 20)
    budget: int = Field(8000, ge=1)  # objective evaluations = API calls (paper: 8,000)
    sigma0: float = Field(1.0, gt=0)  # σ_z, CMA-ES initial step size (paper: 1)
    bound: float = Field(0.0, ge=0)  # box bound on z (0: none; the paper uses none for CMA-ES)


BBT_FORMAT = "lfm.tuning.bbt/1"
PROMPT_FILE = "prompt.safetensors"


@dataclass(kw_only=True)
class BBTResult(TuneResult):
    """The best soft prompt found, what regenerates its projection, and the run's record.

    `history` holds the best loss after each CMA-ES generation.
    """

    prompt: torch.Tensor  # (n, D): p = A z*
    z: np.ndarray  # (d,)
    verbalizer: Verbalizer
    seed: int  # the projection A's seed (CMA-ES's is `cma_seed(seed)`: plus one)
    emb_std: float  # σ̂, the std of the input embeddings A was scaled to
    start_loss: float  # loss of the starting prompt (z = 0)
    best_loss: float
    evaluations: int = 0
    stopped: str = "budget"  # "budget" (evaluations), "api-budget" (client budget) or "cma"

    def scores(self, handle: Any, texts: Sequence[str]) -> torch.Tensor:
        """Label-word logits (N, C) of `texts` with the soft prompt prepended (EMBEDDINGS)."""
        return class_scores_bbt(handle, self.prompt, texts, self.verbalizer)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "start_loss": self.start_loss, "best_loss": self.best_loss,
                "evaluations": self.evaluations, "stopped": self.stopped, "seed": self.seed,
                "prompt_shape": list(self.prompt.shape), "verbalizer": self.verbalizer.to_dict()}  # fmt: skip

    def _save_parts(self, folder: Path) -> None:
        z = torch.as_tensor(self.z, dtype=torch.float64)
        save_tensors(folder / PROMPT_FILE, {"prompt": self.prompt, "z": z}, BBT_FORMAT,
                     seed=self.seed, emb_std=self.emb_std, sigma0=self.config.sigma0,
                     verbalizer=self.verbalizer.to_dict())  # fmt: skip


def load_prompt(folder: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The soft prompt (n, D) saved by `BBTResult.save`, and its metadata (seed, z, verbaliser).

    `projection(d, n, D, meta["emb_std"], meta["sigma0"], meta["seed"]) @ z` gives it again.
    """
    tensors, meta = load_tensors(Path(folder) / PROMPT_FILE, BBT_FORMAT)
    return tensors["prompt"], {**meta, "z": tensors["z"]}


def projection(d: int, n: int, dim: int, emb_std: float, sigma0: float, seed: int) -> torch.Tensor:
    """The fixed random A (n·D, d) with entries N(0, σ̂ / (√d σ_z)), so that p = A z has std ≈ σ̂."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * dim, d, generator=g) * (emb_std / (math.sqrt(d) * sigma0))


def soft_prompt(z: np.ndarray, a: torch.Tensor, n: int) -> torch.Tensor:
    """p = A z reshaped to (n, D)."""
    return (a @ torch.as_tensor(z, dtype=torch.float32)).view(n, -1)


def prepend(
    prompt: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """[p; E(x)] for right-padded inputs: embeds (B, n+T, D), mask (B, n+T), last positions (B,)."""
    b, n = embeds.shape[0], prompt.shape[0]
    full = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embeds], dim=1)
    full_mask = torch.cat([torch.ones(b, n, dtype=mask.dtype), mask], dim=1)
    return full, full_mask, full_mask.sum(1) - 1


def last_logits(
    handle: Any, embeds: torch.Tensor, mask: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """Logits (B, V) at the given positions; a remote handle returns only those rows over the wire."""
    if "positions" in inspect.signature(handle.logits_from_embeds).parameters:
        return handle.logits_from_embeds(embeds, mask, positions=last)
    return handle.logits_from_embeds(embeds, mask)[torch.arange(len(last)), last]


def label_loss(logits: torch.Tensor, label_ids: torch.Tensor, y: torch.Tensor) -> float:
    """Cross-entropy of the gold label word among the label words (the paper's CE loss)."""
    return float(torch.nn.functional.cross_entropy(logits[:, label_ids], y))


def label_ids(handle: Any, verb: Verbalizer) -> torch.Tensor:
    """The first token id of each label word, scored with a leading space."""
    return torch.tensor([handle.encode(f" {w}")[0] for w in verb.label_words])


def make_objective(handle: Any, texts: Sequence[str], y: torch.Tensor, verb: Verbalizer,
                   a: torch.Tensor, n: int) -> Callable[[np.ndarray], float]:  # fmt: skip
    """z -> loss on the train set: one `logits_from_embeds` call per evaluation."""
    embeds, mask = handle.embed([verb.prompt(t) for t in texts])
    ids = label_ids(handle, verb)

    def f(z: np.ndarray) -> float:
        full, full_mask, last = prepend(soft_prompt(z, a, n), embeds, mask)
        return label_loss(last_logits(handle, full, full_mask, last), ids, y)

    return f


def class_scores_bbt(
    handle: Any, prompt: torch.Tensor, texts: Sequence[str], verb: Verbalizer
) -> torch.Tensor:
    """Label-word logits (N, C) with the soft prompt prepended: the BBT classifier."""
    require(handle, Access.EMBEDDINGS, "tuning/bbt")
    embeds, mask = handle.embed([verb.prompt(t) for t in texts])
    full, full_mask, last = prepend(prompt, embeds, mask)
    return last_logits(handle, full, full_mask, last)[:, label_ids(handle, verb)]


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example_summary(res: BBTResult) -> dict[str, Any]:
    return {"start": res.start_loss, "best": res.best_loss, "evaluations": res.evaluations,
            "prompt": res.prompt}  # fmt: skip


# pragma: no mutate end


def bbt(
    handle: EmbeddingsModel,
    data: TextClassification,
    cfg: BBTConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = False,
    log: ReplayLog | None = None,
) -> BBTResult:
    """Search a soft prompt with CMA-ES through an EMBEDDINGS handle (local, narrowed or remote).

    Args:
        handle: gives `embed` and `logits_from_embeds`.
        data: the few-shot train set, with its verbaliser (template and label words).
        cfg: BBT settings; `budget` bounds the evaluations, a client `Budget` the HTTP calls.
        seed: seeds the projection and CMA-ES.
        progress: show a bar over the evaluations with the best loss so far (stderr).
        log: log every evaluation into a run directory (once per generation), and replay those
            it already holds instead of calling the model: a resumed search ends as an
            uninterrupted one.
    """
    data_kind(data, "bbt", {TextClassification: "a TextClassification"})
    verb, texts, y = data.needs_verbalizer("BBT"), data.texts, data.labels
    embeds, mask = handle.embed([verb.prompt(t) for t in texts[:8]])
    emb_std = float(embeds[mask.bool()].std())
    a = projection(cfg.intrinsic_dim, cfg.n_tokens, embeds.shape[-1], emb_std, cfg.sigma0, seed)
    f = make_objective(handle, texts, y, verb, a, cfg.n_tokens)
    log = log or ReplayLog()
    f = log.wrap(f, vector_hash)
    z0 = np.zeros(cfg.intrinsic_dim)
    start = f(z0)
    res = BBTResult(method="bbt", config=cfg, prompt=soft_prompt(z0, a, cfg.n_tokens), z=z0,
                    verbalizer=verb, seed=seed, emb_std=emb_std, start_loss=start,
                    best_loss=start, evaluations=1)  # fmt: skip
    with tqdm(total=cfg.budget, initial=1, desc="bbt", disable=not progress,
              dynamic_ncols=True) as bar:  # fmt: skip
        _search(f, cfg, seed, res, a, bar, log.flush)
    log.flush()
    return res


bbt = register(
    "tuning", "bbt", shape=TUNER, branch="input engineering", access=Access.EMBEDDINGS,
    config=BBTConfig, paper="Sun et al. 2022, Black-Box Tuning for LMaaS, arXiv 2201.03514",
    example=example(BBTConfig(n_tokens=4, intrinsic_dim=8, popsize=6, budget=13), steps=None,
                    summary=_example_summary),
    cli="lfm tuning bbt",
)(bbt)  # fmt: skip


class CmaRandom:
    """NumPy's global generator as CMA-ES alone sees it.

    `cma` draws its samples from NumPy's global generator, which it seeds from its `seed` option
    when a strategy is built. `with own():` around every call into the strategy swaps this
    generator's state in and the caller's back after, so that the candidates are a function of
    the seed alone: whatever else draws from NumPy between two generations (a model, a
    tokenizer; none of it on a replayed evaluation) neither shifts them nor is shifted by them.
    """

    def __init__(self) -> None:
        self.state: Any = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        outside = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        try:
            yield
        finally:
            self.state = np.random.get_state()
            np.random.set_state(outside)


def _search(
    f: Callable[[np.ndarray], float], cfg: BBTConfig, seed: int, res: BBTResult, a: torch.Tensor,
    bar: Any, flush: Callable[[], None],
) -> None:  # fmt: skip
    # verbose -10: silent, and deaf to a `cma_signals.in` in the working directory (at -9 `cma`
    # reads options from one every generation, so a stray file would steer the search)
    opts = {"popsize": cfg.popsize, "seed": cma_seed(seed), "verbose": -10, "maxfevals": cfg.budget}
    if cfg.bound > 0:
        opts["bounds"] = [-cfg.bound, cfg.bound]
    own = CmaRandom()
    with own():
        es = cma.CMAEvolutionStrategy(res.z, cfg.sigma0, opts)
    while res.evaluations < cfg.budget and not _stopped(es, own):
        with own():
            xs = es.ask()[: cfg.budget - res.evaluations]
        try:
            losses = [f(x) for x in xs]
        except BudgetExceeded:
            res.stopped = "api-budget"
            return
        finally:
            flush()  # one write per generation: a killed run loses at most this one
        res.evaluations += len(xs)
        _keep_best(res, xs, losses, a, cfg.n_tokens)
        bar.update(len(xs))
        bar.set_postfix(best_loss=f"{res.best_loss:.4f}")
        if len(xs) < cfg.popsize:
            break
        with own():
            es.tell(xs, losses)
    res.stopped = "budget" if res.evaluations >= cfg.budget else "cma"


def cma_seed(seed: int) -> int:
    """CMA-ES's seed: `seed + 1`, kept inside NumPy's range 1 … 2³² − 1 (`cma` reads a seed of 0
    as "from the clock", and NumPy refuses one outside its range)."""
    s = seed + 1
    return s if 0 < s < 2**32 else s % (2**32 - 1) + 1


def _stopped(es: Any, own: CmaRandom) -> bool:
    with own():
        return bool(es.stop())


def _keep_best(
    res: BBTResult, xs: list[np.ndarray], losses: list[float], a: torch.Tensor, n: int
) -> None:
    i = int(np.argmin(losses))
    if losses[i] < res.best_loss:
        res.best_loss, res.z = losses[i], np.asarray(xs[i])
        res.prompt = soft_prompt(res.z, a, n)
    res.history.append(res.best_loss)
