"""Retrieval augmentation: kNN-LM (HIDDEN access) and REPLUG-style ensembling (SCORES access).

kNN-LM (Khandelwal et al. 2020, arXiv 1911.00172) keeps a datastore of (final hidden state h_t,
next token w_{t+1}) pairs; a query's hidden state q retrieves its k nearest keys and

    p_kNN(w) ∝ Σ_{(h, w') ∈ N(q)} 1[w' = w] exp(−‖q − h‖² / T),
    p(w) = λ p_kNN(w) + (1 − λ) p_LM(w).

REPLUG (Shi et al. 2023, arXiv 2301.12652) retrieves the k documents most similar to the input
(cosine of mean-pooled encoder embeddings, e.g. `minilm-l6`), prepends each to the input, and
ensembles the LM's next-token distributions weighted by the retrieval scores:

    p(w | x) = Σ_{d ∈ top-k} λ_d p_LM(w | d ∘ x),   λ = softmax(s(d, x) / τ).

This module is the maths; the tuners `knn_lm` and `replug`, which return the augmented model as a
handle, are in `lfm.tuning.augmented`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from lfm.access import Access, require
from lfm.assets.embed import Embedder, char_embedder, minilm_embedder  # noqa: F401  (part of this API)
from lfm.config import Config


class KnnLMConfig(Config):
    k: int = Field(1024, ge=1)  # neighbours (paper: 1024)
    lam: float = Field(0.25, ge=0, le=1)  # λ interpolation weight (paper: 0.25 on WikiText-103)
    temperature: float = Field(1.0, gt=0)  # T in exp(−d / T) (paper: 1)
    module: str = "model.norm"  # the module whose output is the key (Llama: the final norm)


class ReplugConfig(Config):
    k: int = Field(10, ge=1)  # retrieved documents (paper: 10)
    temperature: float = Field(1.0, gt=0)  # τ on the retrieval scores
    doc_chars: int = Field(600, ge=1)  # each document is cut to this many characters
    separator: str = "\n\n"  # between a document and the input


@dataclass(frozen=True)
class Datastore:
    keys: torch.Tensor  # (N, D) hidden states
    values: torch.Tensor  # (N,) next-token ids
    module: str


def build_datastore(
    handle: Any, texts: Sequence[str], module: str = "model.norm", desc: str | None = None
) -> Datastore:
    """(h_t, w_{t+1}) for every position of every text (one text per call: no padding); `desc`
    shows a progress bar over the texts."""
    require(handle, Access.HIDDEN, "tuning/knn_lm")
    keys, values = [], []
    for text in tqdm(texts, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        h = handle.hidden([text], [module])[module][0]  # (T, D)
        ids = torch.tensor(handle.encode(text))[-(h.shape[0] - 1) :]  # targets of positions 0..T-2
        keys.append(h[-len(ids) - 1 : -1])
        values.append(ids)
    return Datastore(torch.cat(keys), torch.cat(values), module)


def knn_distribution(
    q: torch.Tensor, store: Datastore, vocab: int, k: int, temperature: float
) -> torch.Tensor:
    """p_kNN (V,) for one query q (D,): softmax(−‖q − h‖² / T) over the k nearest, summed per token."""
    d2 = ((store.keys - q) ** 2).sum(-1)
    dist, idx = d2.topk(min(k, len(d2)), largest=False)
    w = torch.softmax(-dist / temperature, 0)
    return torch.zeros(vocab).index_add_(0, store.values[idx], w)


def knn_logprobs(
    handle: Any, prompts: Sequence[str], store: Datastore, cfg: KnnLMConfig = KnnLMConfig()
) -> torch.Tensor:
    """log p(next token) (B, V) interpolating the LM with the datastore's neighbours (HIDDEN)."""
    require(handle, Access.HIDDEN, "tuning/knn_lm")
    lm = handle.next_token_logprobs(prompts).exp()
    rows = []
    for i, p in enumerate(prompts):
        q = handle.hidden([p], [store.module])[store.module][0, -1]
        knn = knn_distribution(q, store, lm.shape[1], cfg.k, cfg.temperature)
        rows.append((cfg.lam * knn + (1 - cfg.lam) * lm[i]).clamp_min(1e-30).log())
    return torch.stack(rows)


def knn_target_probs(queries: torch.Tensor, targets: torch.Tensor, store: Datastore, k: int,
                     temperature: float, chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """p_kNN(target) (T,) for queries (T, D) and their true next tokens (T,): perplexity needs only these."""
    out = []
    for q, t in zip(queries.split(chunk), targets.split(chunk), strict=True):
        d2 = torch.cdist(q.float(), store.keys.float()).square()  # (t, N)
        dist, idx = d2.topk(min(k, d2.shape[1]), largest=False)
        w = torch.softmax(-dist / temperature, -1)  # (t, k)
        out.append((w * (store.values[idx] == t.unsqueeze(1))).sum(-1))
    return torch.cat(out)


def token_queries(
    handle: Any, text: str, module: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each position t < T−1 of `text`: the key h_t (T−1, D), log p_LM(w_{t+1}) and w_{t+1} (T−1,)."""
    require(handle, Access.HIDDEN, "tuning/knn_lm")
    h = handle.hidden([text], [module])[module][0]  # (T, D)
    emb, mask = handle.embed([text])
    logp = handle.logits_from_embeds(emb, mask)[0].log_softmax(-1)  # (T, V)
    ids = torch.tensor(handle.encode(text))[-(h.shape[0] - 1) :]
    lm = logp[-len(ids) - 1 : -1].gather(1, ids.unsqueeze(1)).squeeze(1)
    return h[-len(ids) - 1 : -1], lm, ids


def interpolate(lm_logp: torch.Tensor, knn_p: torch.Tensor, lam: float) -> torch.Tensor:
    """log(λ p_kNN + (1 − λ) p_LM) per token."""
    return (lam * knn_p + (1 - lam) * lm_logp.exp()).clamp_min(1e-30).log()


def retrieve(
    query_emb: torch.Tensor, doc_embs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores and indices of the k documents nearest each query: (B, k), (B, k)."""
    q = torch.nn.functional.normalize(query_emb, dim=-1)
    d = torch.nn.functional.normalize(doc_embs, dim=-1)
    return (q @ d.T).topk(min(k, d.shape[0]), dim=-1)


def replug_logprobs(handle: Any, prompts: Sequence[str], docs: Sequence[str], embed: Embedder,
                    cfg: ReplugConfig = ReplugConfig(), doc_embs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """log p(next token | prompt) (B, V): the retrieval-weighted ensemble over the top-k documents.

    Args:
        handle: a SCORES handle (its `next_token_logprobs` is all that is called).
        prompts: inputs; docs: the corpus; embed: texts -> (N, E) retrieval embeddings.
        cfg: k, temperature, document cut; doc_embs: precomputed `embed(docs)`.
    """
    require(handle, Access.SCORES, "tuning/replug")
    doc_embs = embed(docs) if doc_embs is None else doc_embs
    scores, idx = retrieve(embed(prompts), doc_embs, cfg.k)
    weights = torch.softmax(scores / cfg.temperature, -1)  # (B, k)
    flat = [
        docs[j][: cfg.doc_chars] + cfg.separator + p
        for p, row in zip(prompts, idx.tolist(), strict=True)
        for j in row
    ]
    logp = handle.next_token_logprobs(flat).view(len(prompts), idx.shape[1], -1)  # (B, k, V)
    return torch.logsumexp(logp + weights.log().unsqueeze(-1), dim=1)


def replug_score(handle: Any, prefixes: Sequence[str], continuations: Sequence[str],
                 docs: Sequence[str], embed: Embedder, cfg: ReplugConfig = ReplugConfig(),
                 doc_embs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """log p(y | x) (B,) = log Σ_d λ_d p(y | d ∘ x) over the top-k documents retrieved for x.

    The ensemble of REPLUG's equation with y the whole continuation (sequence level), so only
    `score` is called: SCORES access, served or local.
    """
    require(handle, Access.SCORES, "tuning/replug")
    doc_embs = embed(docs) if doc_embs is None else doc_embs
    sims, idx = retrieve(embed(prefixes), doc_embs, cfg.k)
    weights = torch.softmax(sims / cfg.temperature, -1)  # (B, k)
    flat_p = [docs[j][: cfg.doc_chars] + cfg.separator + x
              for x, row in zip(prefixes, idx.tolist(), strict=True) for j in row]  # fmt: skip
    flat_c = [y for y in continuations for _ in range(idx.shape[1])]
    logp = handle.score(flat_p, flat_c).view(len(prefixes), idx.shape[1])  # (B, k)
    return torch.logsumexp(logp + weights.log(), dim=1)
