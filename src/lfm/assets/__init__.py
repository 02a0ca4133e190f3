"""Offline models and data sets by name (see docs/assets.md)."""

from lfm.assets.cache import cache_dir
from lfm.assets.datasets import DATASETS, ArrayDataset, TextDataset, load_dataset
from lfm.assets.models import DEFAULT_MODEL, MODELS, describe, load_model, load_offloaded

__all__ = [
    "DATASETS",
    "DEFAULT_MODEL",
    "MODELS",
    "ArrayDataset",
    "TextDataset",
    "cache_dir",
    "describe",
    "load_dataset",
    "load_model",
    "load_offloaded",
]
