"""Model distillation (survey branch "with data"): losses as pure functions and a distiller.

Importing this package registers the losses: `kd`, `reverse_kl`, `topk_kd`, `dist` (SCORES) and
`fitnets`, `at`, `rkd`, `pkt` (HIDDEN).
"""

from lfm.distill import features, losses
from lfm.distill.distiller import distill
from lfm.distill.features import at_loss, fitnets_loss, pkt_loss, rkd_loss
from lfm.distill.losses import dist_loss, kd_loss, reverse_kl_loss, topk_kd_loss

__all__ = [
    "at_loss",
    "dist_loss",
    "distill",
    "features",
    "fitnets_loss",
    "kd_loss",
    "losses",
    "pkt_loss",
    "reverse_kl_loss",
    "rkd_loss",
    "topk_kd_loss",
]
