"""Database augmentation as tuners: kNN-LM and REPLUG return a retrieval-augmented handle.

    result = knn_lm(narrow(model, "hidden"), Corpus(texts))          # a datastore of the texts
    result.handle.next_token_logprobs(["The team won the"])          # λ p_kNN + (1 − λ) p_LM
    result = replug(narrow(model, "scores"), Documents(docs), embed=char_embedder)
    result.handle.score(["The team"], [" won the match"])            # Σ_d λ_d p(y | d ∘ x)

The augmented handle is a SCORES handle (`score`, `next_token_logprobs`, `generate`, `encode`),
so whatever takes a SCORES handle (prompt search, a logit ensemble, a served model) runs on the
augmented model. It reaches the model only through the handle it was built on (HIDDEN for kNN-LM,
SCORES for REPLUG). The maths lives in `lfm.tuning.retrieval`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lfm.access import Access, HiddenModel, ScoresModel
from lfm.core.io import load_tensors, save_tensors
from lfm.registry import register
from lfm.tuning.contract import TUNER
from lfm.tuning.results import TuneResult
from lfm.tuning.retrieval import (
    Datastore,
    Embedder,
    KnnLMConfig,
    ReplugConfig,
    build_datastore,
    char_embedder,
    interpolate,
    knn_logprobs,
    knn_target_probs,
    minilm_embedder,
    replug_logprobs,
    replug_score,
    token_queries,
)
from lfm.tuning.tasks import Corpus, Documents
from lfm.tuning.tiny import CORPUS, example
from lfm.tuning.trainer import data_kind

DATASTORE_FILE = "datastore.safetensors"
DOCUMENTS_FILE = "documents.safetensors"


class _Augmented:
    """What both augmented handles share: SCORES access, tokenisation and greedy generation."""

    access: ClassVar[Access] = Access.SCORES

    def __init__(self, base: Any, name: str):
        self._base = base
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, access=SCORES)"

    @property
    def vocab_size(self) -> int:
        return int(self._base.vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(self._base.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._base.decode(ids))

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **_: Any) -> list[str]:
        """Greedy continuation under the augmented next-token distribution."""
        outs = []
        for p in prompts:
            ids: list[int] = []
            for _ in range(max_new_tokens):
                ids.append(int(self.next_token_logprobs([p + self.decode(ids)])[0].argmax()))
            outs.append(self.decode(ids))
        return outs


class KnnLMHandle(_Augmented):
    """A language model interpolated with a kNN datastore (kNN-LM), as a SCORES handle."""

    def __init__(self, base: Any, store: Datastore, cfg: KnnLMConfig):
        super().__init__(base, f"knn_lm({getattr(base, 'name', 'model')})")
        self.store, self.cfg = store, cfg

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return knn_logprobs(self._base, prompts, self.store, self.cfg)

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        """Σ over the continuation's tokens of log(λ p_kNN + (1 − λ) p_LM), shape (B,)."""
        out = []
        for p, c in zip(prompts, continuations, strict=True):
            q, lm_logp, ids = token_queries(self._base, p + c, self.store.module)
            n = min(len(ids), len(self.encode(p + c)) - len(self.encode(p)))
            if n <= 0:
                out.append(torch.zeros(()))
                continue
            pk = knn_target_probs(q[-n:], ids[-n:], self.store, self.cfg.k, self.cfg.temperature)
            out.append(interpolate(lm_logp[-n:], pk, self.cfg.lam).sum())
        return torch.stack(out)


class ReplugHandle(_Augmented):
    """A language model ensembled over retrieved documents (REPLUG), as a SCORES handle."""

    def __init__(self, base: Any, docs: Documents, embed: Embedder, cfg: ReplugConfig):
        super().__init__(base, f"replug({getattr(base, 'name', 'model')})")
        self.docs, self.embed, self.cfg = docs, embed, cfg
        self.doc_embs = docs.embeddings if docs.embeddings is not None else embed(docs.texts)

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return replug_logprobs(self._base, prompts, self.docs.texts, self.embed, self.cfg,
                               self.doc_embs)  # fmt: skip

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        return replug_score(self._base, prompts, continuations, self.docs.texts, self.embed,
                            self.cfg, self.doc_embs)  # fmt: skip


@dataclass(kw_only=True)
class RetrievalResult(TuneResult):
    """A retrieval-augmented handle, and the datastore or documents behind it."""

    handle: KnnLMHandle | ReplugHandle

    def record(self) -> dict[str, Any]:
        h = self.handle
        size = len(h.store.values) if isinstance(h, KnnLMHandle) else len(h.docs.texts)
        return {**super().record(), "entries": size}

    def _save_parts(self, folder: Path) -> None:
        h = self.handle
        if isinstance(h, KnnLMHandle):
            save_tensors(folder / DATASTORE_FILE, {"keys": h.store.keys, "values": h.store.values},
                         "lfm.tuning.knn_lm/1", module=h.store.module)  # fmt: skip
        else:
            save_tensors(folder / DOCUMENTS_FILE, {"embeddings": h.doc_embs},
                         "lfm.tuning.replug/1", texts=list(h.docs.texts))  # fmt: skip


def load_datastore(folder: str | Path) -> Datastore:
    """The kNN-LM datastore saved by `RetrievalResult.save` (`KnnLMHandle(base, it, cfg)`)."""
    tensors, meta = load_tensors(Path(folder) / DATASTORE_FILE, "lfm.tuning.knn_lm/1")
    return Datastore(tensors["keys"], tensors["values"], str(meta["module"]))


def load_documents(folder: str | Path) -> Documents:
    """REPLUG's documents and their embeddings saved by `RetrievalResult.save` (the embedder
    itself is code: pass the same one to `ReplugHandle`)."""
    tensors, meta = load_tensors(Path(folder) / DOCUMENTS_FILE, "lfm.tuning.replug/1")
    return Documents(tuple(meta["texts"]), tensors["embeddings"])


def _example_summary(res: RetrievalResult) -> torch.Tensor:
    return res.handle.next_token_logprobs(["Article: The team won the"])


@register("tuning", "knn_lm", shape=TUNER, branch="database augmentation", access=Access.HIDDEN,
          config=KnnLMConfig, paper="Khandelwal et al. 2020, kNN-LM, arXiv 1911.00172",
          example=example(KnnLMConfig(), data=lambda: Corpus(CORPUS[:2]), steps=None, seed=False,
                          summary=_example_summary),
          cli="lfm tuning augment --method knn_lm", data=Corpus)  # fmt: skip
def knn_lm(
    handle: HiddenModel, data: Corpus, cfg: KnnLMConfig | None = None, *, progress: bool = False
) -> RetrievalResult:
    """A datastore of every position of `data`'s texts, and the kNN-LM handle over it.

    Args:
        handle: a HIDDEN handle (its hidden states at `cfg.module` are the keys).
        data: the texts of the datastore.
        cfg: k, λ, temperature and the key module.
        progress: show a bar over the texts while the datastore is built (stderr).
    """
    data_kind(data, "knn_lm", {Corpus: "a Corpus"})
    store = build_datastore(handle, data.texts, cfg.module, "datastore" if progress else None)
    return RetrievalResult(method="knn_lm", config=cfg, handle=KnnLMHandle(handle, store, cfg),
                           metrics={"entries": len(store.values)})  # fmt: skip


@register("tuning", "replug", shape=TUNER, branch="database augmentation", access=Access.SCORES,
          config=ReplugConfig, paper="Shi et al. 2023, REPLUG, arXiv 2301.12652",
          example=example(ReplugConfig(k=2), data=lambda: Documents(CORPUS), steps=None,
                          seed=False, summary=_example_summary, embed=char_embedder),
          cli="lfm tuning augment --method replug", data=Documents)  # fmt: skip
def replug(
    handle: ScoresModel,
    data: Documents,
    cfg: ReplugConfig | None = None,
    *,
    embed: Embedder | None = None,
) -> RetrievalResult:
    """The REPLUG handle over `data`'s documents (their embeddings computed once, here).

    Args:
        handle: a SCORES handle (`next_token_logprobs` and `score` are all that is called).
        data: the documents to retrieve from.
        cfg: k, temperature, document cut and separator.
        embed: texts -> (N, E) retrieval embeddings; None: mean-pooled `minilm-l6` (an asset).
    """
    data_kind(data, "replug", {Documents: "Documents"})
    embed = embed or minilm_embedder()
    h = ReplugHandle(handle, data, embed, cfg)
    return RetrievalResult(method="replug", config=cfg, handle=h,
                           metrics={"entries": len(data.texts)})  # fmt: skip
