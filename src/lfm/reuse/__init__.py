"""Model reuse: merging fine-tuned models, aligning them, and ensembling their outputs.

Per-tensor kernels (`kernels.py`), registered with paper defaults (`methods.py`), are mapped over
parameter names by one driver (`driver.py`), in memory (`merge_state_dicts`) or streamed from
safetensors shards to sharded output (`engine.merge_models`). Data-aware merges (Fisher, RegMean
in `datamerge.py`; AdaMerging in `adamerging.py`) read statistics saved by `stats.py`;
`rebasin.py` aligns hidden units for mode connectivity (`connect.py`: interpolation paths);
`ensemble.py` combines outputs of handles at SCORES or TEXT access.
"""

from lfm.reuse import (  # noqa: F401  (registers the methods)
    adamerging,
    datamerge,
    ensemble,
    methods,
    rebasin,
)
from lfm.reuse.driver import (
    MergeError,
    MissingTensorError,
    ShapeMismatchError,
    merge_state_dicts,
)
from lfm.reuse.engine import merge_models

__all__ = [
    "MergeError",
    "MissingTensorError",
    "ShapeMismatchError",
    "merge_models",
    "merge_state_dicts",
]
