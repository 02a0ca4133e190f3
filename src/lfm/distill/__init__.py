"""Model distillation: losses as pure functions, the distiller, and whole methods.

Importing this package registers the losses `kd`, `reverse_kl`, `topk_kd`, `dist`, `skew_kl` (SCORES) and
`fitnets`, `at`, `rkd`, `pkt` (HIDDEN), each run by name through the distiller
(`lfm.registry.run("distill/kd", teacher, student, data)`), and the distillers `lm_student`
(layer-dropped LM students, WEIGHTS), `topk_lm` and `gkd` (teachers that send top-k
log-probabilities, SCORES), `uld` (a teacher with another tokenizer, SCORES), `seq_kd` and
`step_by_step` (TEXT teachers), and the
data-free `deep_inversion`, `dafl`, `dfad` (WEIGHTS) and `dfme` (SCORES).
"""

from lfm.distill import adversarial, datafree, features, lm, losses, seqkd, served, skew, xtok
from lfm.distill.adversarial import dfad, dfme
from lfm.distill.contract import DistillResult, InputSpec
from lfm.distill.datafree import dafl, deep_inversion, deep_inversion_images
from lfm.distill.distiller import distill
from lfm.distill.features import at_loss, fitnets_loss, pkt_loss, rkd_loss
from lfm.distill.lm import lm_student
from lfm.distill.losses import dist_loss, kd_loss, reverse_kl_loss, topk_kd_loss
from lfm.distill.seqkd import seq_kd, step_by_step
from lfm.distill.served import TopKCache, cache_topk, gkd, topk_lm
from lfm.distill.xtok import uld

__all__ = [
    "DistillResult",
    "InputSpec",
    "TopKCache",
    "adversarial",
    "at_loss",
    "cache_topk",
    "dafl",
    "datafree",
    "deep_inversion",
    "deep_inversion_images",
    "dfad",
    "dfme",
    "dist_loss",
    "distill",
    "features",
    "fitnets_loss",
    "gkd",
    "kd_loss",
    "lm",
    "lm_student",
    "losses",
    "pkt_loss",
    "reverse_kl_loss",
    "rkd_loss",
    "seq_kd",
    "seqkd",
    "served",
    "skew",
    "step_by_step",
    "topk_kd_loss",
    "topk_lm",
    "uld",
    "xtok",
]
