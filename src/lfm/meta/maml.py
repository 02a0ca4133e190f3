"""The MAML family: one functional implementation, four registry entries.

MAML (Finn et al. 2017, arXiv 1703.03400) meta-learns an initialisation θ by differentiating the
query loss through the inner update θ'_i = θ − α ∇_θ L_{T_i}(f_θ) (Eq. 1):

    min_θ Σ_i L_{T_i}(f_{θ'_i})                                         (Eq. 2)

- `maml`: second order (the Hessian-vector term of ∇_θ θ'_i is kept).
- `fomaml`: first order, ∇_θ θ'_i ≈ I (MAML Sec. 5.2).
- `anil`: the inner loop adapts the head only; the body is learned by the outer loop alone
  (Raghu et al. 2019, arXiv 1909.09157).
- `metasgd`: θ'_i = θ − α ∘ ∇L with α a learned tensor per parameter (Li et al. 2017,
  arXiv 1707.09835, Eq. 3), meta-learned jointly with θ.

They differ in config defaults only: four `register` calls over one learner (the outer loop of
`lfm.meta.train` with objective `query_objective` and prediction `adapted_predict`).

    result = lfm.meta.maml(model, SinusoidTasks(5, 10), {"steps": 2000})
    meta_test(result, SinusoidTasks(5, 100))            # adapts the way MAML does
"""

from __future__ import annotations

from typing import Any

from lfm.meta.functional import MetaConfig, adapted_predict
from lfm.meta.tiny import data_example
from lfm.meta.train import query_objective, register_learner

BRANCH = "meta-learning from data"

# Paper settings per task family, to pass as `Config.build(PRESETS[...])` or `cfg.replace(**...)`.
PRESETS: dict[str, dict[str, Any]] = {
    # MAML Sec. 5.1: α = 0.01, one step, K-shot, meta-batch 25, Adam β = 1e-3.
    "sinusoid": {"inner_lr": 0.01, "inner_steps": 1, "meta_batch": 25, "outer_lr": 1e-3},
    # MAML Sec. 5.2 (Omniglot 5-way): α = 0.4, one step at train, three at test, meta-batch 32.
    "omniglot": {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3, "meta_batch": 32},
    # MAML Sec. 5.2 (MiniImagenet): α = 0.01, five steps at train, ten at test, meta-batch 4.
    "miniimagenet": {"inner_lr": 0.01, "inner_steps": 5, "test_inner_steps": 10, "meta_batch": 4},
}


class MAMLConfig(MetaConfig):
    """MAML, second order; defaults of the sinusoid experiment (MAML Sec. 5.1)."""


class FOMAMLConfig(MetaConfig):
    """First-order MAML."""

    first_order: bool = True  # ∇_θ θ'_i ≈ I: no differentiation through the inner gradient


class ANILConfig(MetaConfig):
    """Almost No Inner Loop: adapt the head only."""

    inner_params: tuple[str, ...] = (
        "head",
    )  # ANIL: the final layer (named `head` in lfm.meta.models)


class MetaSGDConfig(MetaConfig):
    """Meta-SGD: learned per-parameter step sizes, initialised to `inner_lr`."""

    learn_inner_lr: bool = True  # α is a tensor per parameter, trained by the outer loop


def _entry(name: str, config: type[MetaConfig], paper: str) -> Any:
    return register_learner(
        name, objective=query_objective, predict=adapted_predict, branch=BRANCH, config=config,
        paper=paper, example=data_example(config), cli=f"lfm meta train --method {name}",
    )  # fmt: skip


maml = _entry("maml", MAMLConfig, "Finn et al. 2017, arXiv 1703.03400")
fomaml = _entry(
    "fomaml", FOMAMLConfig, "Finn et al. 2017, arXiv 1703.03400 (first-order, Sec. 5.2)"
)
anil = _entry("anil", ANILConfig, "Raghu et al. 2019, arXiv 1909.09157")
metasgd = _entry("metasgd", MetaSGDConfig, "Li et al. 2017, arXiv 1707.09835")
