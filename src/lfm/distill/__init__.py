"""Model distillation (survey branch "with data"): losses as pure functions and a distiller.

Importing this package registers the losses: `kd`, `reverse_kl`, `topk_kd`, `dist` (SCORES) and
`fitnets`, `at`, `rkd`, `pkt` (HIDDEN), and the methods `lm_student` (layer-dropped LM students),
`seq_kd` and `step_by_step` (TEXT teachers), and the data-free `deep_inversion`, `dafl`, `dfad`
(WEIGHTS) and `dfme` (SCORES).
"""

from lfm.distill import adversarial, datafree, features, lm, losses, seqkd
from lfm.distill.distiller import distill
from lfm.distill.features import at_loss, fitnets_loss, pkt_loss, rkd_loss
from lfm.distill.losses import dist_loss, kd_loss, reverse_kl_loss, topk_kd_loss

__all__ = [
    "adversarial",
    "at_loss",
    "datafree",
    "dist_loss",
    "distill",
    "features",
    "fitnets_loss",
    "kd_loss",
    "lm",
    "losses",
    "pkt_loss",
    "reverse_kl_loss",
    "rkd_loss",
    "seqkd",
    "topk_kd_loss",
]
