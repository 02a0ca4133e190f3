"""Model reuse: merging fine-tuned models by weight interpolation.

Per-tensor kernels (`kernels.py`), registered with paper defaults (`methods.py`), are mapped over
parameter names by one driver (`driver.py`), in memory (`merge_state_dicts`) or streamed from
safetensors shards to sharded output (`engine.merge_models`).
"""

from lfm.reuse import methods  # noqa: F401  (registers the merge methods)
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
