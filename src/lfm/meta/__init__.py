"""Meta learning: learn, from many tasks, how to learn a new one from few examples.

Every method is a learner `(model, tasks, cfg) -> MetaResult`, chosen by its registered name:
the functional MAML family (`maml`, `fomaml`, `anil`, `metasgd`), `reptile`, `protonets` and the
`pretrain` baseline learn from a task source (`SinusoidTasks`, `EpisodeTasks`);
`datafree_whitebox` and `datafree_blackbox` learn from a `ModelPool` of pretrained classifiers
without their data. `meta_test` adapts to held-out tasks the way the method does. Importing this
package registers the methods.

    result = maml(model, SinusoidTasks(5, 10), MAMLConfig(steps=2000))
    meta_test(result, SinusoidTasks(5, 100))
"""

from lfm.meta.contract import History, MetaResult, ModelPool
from lfm.meta.datafree import BlackBoxConfig, DataFreeConfig, datafree_blackbox, datafree_whitebox
from lfm.meta.functional import (
    MetaConfig,
    OuterConfig,
    Params,
    Task,
    inner_adapt,
    over_tasks,
    params_of,
)
from lfm.meta.maml import (
    PRESETS,
    ANILConfig,
    FOMAMLConfig,
    MAMLConfig,
    MetaSGDConfig,
    anil,
    fomaml,
    maml,
    metasgd,
)
from lfm.meta.models import MLP, ConvNet
from lfm.meta.protonets import ProtoNetsConfig, protonets
from lfm.meta.reptile import PretrainConfig, ReptileConfig, pretrain, reptile
from lfm.meta.tasks import EpisodeTasks, SinusoidTasks, rotate, rotated_digit_splits, split_classes
from lfm.meta.train import meta_test

__all__ = [
    "MLP",
    "PRESETS",
    "ANILConfig",
    "BlackBoxConfig",
    "ConvNet",
    "DataFreeConfig",
    "EpisodeTasks",
    "FOMAMLConfig",
    "History",
    "MAMLConfig",
    "MetaConfig",
    "MetaResult",
    "MetaSGDConfig",
    "ModelPool",
    "OuterConfig",
    "Params",
    "PretrainConfig",
    "ProtoNetsConfig",
    "ReptileConfig",
    "SinusoidTasks",
    "Task",
    "anil",
    "datafree_blackbox",
    "datafree_whitebox",
    "fomaml",
    "inner_adapt",
    "maml",
    "meta_test",
    "metasgd",
    "over_tasks",
    "params_of",
    "pretrain",
    "protonets",
    "reptile",
    "rotate",
    "rotated_digit_splits",
    "split_classes",
]
