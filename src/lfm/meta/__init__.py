"""Meta learning: learn, from many tasks, how to learn a new one from few examples.

Functional MAML family (MAML, FOMAML, ANIL, Meta-SGD), Reptile, prototypical networks, episode
samplers and the meta-train / meta-test loops; data-free meta-learning from a pool of models
(white-box and black-box). Importing this package registers the methods.
"""

from lfm.meta import datafree, maml, protonets, reptile
from lfm.meta.datafree import BlackBoxConfig, DataFreeConfig
from lfm.meta.functional import (
    MetaConfig,
    OuterConfig,
    Params,
    Task,
    inner_adapt,
    over_tasks,
    params_of,
)
from lfm.meta.maml import PRESETS, ANILConfig, FOMAMLConfig, MAMLConfig, MetaSGDConfig
from lfm.meta.models import MLP, ConvNet
from lfm.meta.protonets import ProtoNetsConfig
from lfm.meta.reptile import PretrainConfig, ReptileConfig
from lfm.meta.tasks import EpisodeTasks, SinusoidTasks, rotate, rotated_digit_splits, split_classes
from lfm.meta.train import History, meta_test, meta_train

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
    "MetaSGDConfig",
    "OuterConfig",
    "Params",
    "PretrainConfig",
    "ProtoNetsConfig",
    "ReptileConfig",
    "SinusoidTasks",
    "Task",
    "datafree",
    "inner_adapt",
    "maml",
    "meta_test",
    "meta_train",
    "over_tasks",
    "params_of",
    "protonets",
    "reptile",
    "rotate",
    "rotated_digit_splits",
    "split_classes",
]
