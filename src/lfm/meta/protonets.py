"""Prototypical networks (Snell et al. 2017, arXiv 1703.05175).

An embedding f_θ maps each support example; class k's prototype is the mean of its embeddings,
c_k = (1/|S_k|) Σ_{x ∈ S_k} f_θ(x) (Eq. 1), and a query is classified by a softmax over negative
squared Euclidean distances (Eq. 2):

    p(y = k | x) ∝ exp(−‖f_θ(x) − c_k‖²).

There is no inner loop: θ is trained on the episodes' query cross-entropy, and meta-test
classifies each held-out episode's queries by its support prototypes (`proto_predict`, the
prediction function of the registry entry).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lfm.meta.functional import OuterConfig, Params, Task, forward
from lfm.meta.tiny import data_example
from lfm.meta.train import Outer, query_objective, register_learner


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


def proto_objective(
    model: nn.Module,
    params: Params,
    tasks: Task,
    problem: Any,
    cfg: Any,
    lrs: Params | None,
    vectorize: bool,
) -> Outer:
    """Mean query cross-entropy of the prototype classifier over a meta-batch (Eq. 2)."""
    return query_objective(model, params, tasks, problem, cfg, lrs, vectorize, proto_predict)


class ProtoNetsConfig(OuterConfig):
    """ProtoNets: Adam 1e-3, one episode per update (Snell et al. Sec. 3)."""

    meta_batch: int = 1  # episodes per update (the paper: one)


protonets = register_learner(
    "protonets", objective=proto_objective, predict=proto_predict,
    branch="meta-learning from data", config=ProtoNetsConfig,
    paper="Snell et al. 2017, arXiv 1703.05175",
    example=data_example(ProtoNetsConfig, classification=True),
    cli="lfm meta train --method protonets --task digits",
)  # fmt: skip
