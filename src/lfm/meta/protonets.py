"""Prototypical networks (Snell et al. 2017, arXiv 1703.05175).

An embedding f_θ maps each support example; class k's prototype is the mean of its embeddings,
c_k = (1/|S_k|) Σ_{x ∈ S_k} f_θ(x) (Eq. 1), and a query is classified by a softmax over negative
squared Euclidean distances (Eq. 2):

    p(y = k | x) ∝ exp(−‖f_θ(x) − c_k‖²).

There is no inner loop: θ is trained on the episodes' query cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lfm.access import Access
from lfm.meta.functional import OuterConfig, Params, Task, forward
from lfm.meta.train import query_objective, smoke_run
from lfm.registry import register


def prototypes(emb: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means (N, D) of support embeddings (S, D); vmap-safe (no data-dependent shapes)."""
    onehot = (labels[:, None] == torch.arange(ways, device=labels.device)).to(emb.dtype)  # (S, N)
    return (onehot.T @ emb) / onehot.sum(0)[:, None].clamp_min(1)


def proto_logits(query: Tensor, protos: Tensor) -> Tensor:
    """−‖q − c_k‖² for each query (Q, D) and prototype (N, D): logits (Q, N)."""
    return -((query[:, None, :] - protos[None, :, :]) ** 2).sum(-1)


def proto_predict(
    model: nn.Module,
    params: Params,
    task: Task,
    problem: Any,
    cfg: Any,
    lrs: Params | None,
    train: bool,
) -> Tensor:
    """Query logits from the support prototypes."""
    protos = prototypes(forward(model, params, task.xs), task.ys, problem.n_out)
    return proto_logits(forward(model, params, task.xq), protos)


class ProtoNetsConfig(OuterConfig):
    """ProtoNets: Adam 1e-3, one episode per update (Snell et al. Sec. 3)."""

    meta_batch: int = 1  # episodes per update (the paper: one)

    predict = staticmethod(proto_predict)  # query logits from the support prototypes


def _smoke(cfg: ProtoNetsConfig, seed: int) -> dict[str, Any]:
    return smoke_run(cfg, seed, classification=True)


register(
    "meta",
    "protonets",
    branch="meta-learning from data",
    access=Access.WEIGHTS,
    config=ProtoNetsConfig,
    paper="Snell et al. 2017, arXiv 1703.05175",
    smoke=_smoke,
)(query_objective)
