"""Model reuse: merging fine-tuned models, aligning them, and ensembling their outputs.

Every method has one of three shapes (`contract.py`): a per-tensor kernel, an ensemble or an
aligner, and runs by name through `lfm.registry.run`:

    run("reuse/ties", [model_a, model_b], base=base, cfg={"density": 0.2})  # merged state dict
    run("reuse/ensemble_average", handles, x)                               # log-probabilities
    run("reuse/rebasin", [model_a, model_b])                                # aligned state dicts

Per-tensor kernels (maths in `kernels.py`, registered with paper defaults in `methods.py`; the
SVD-based merges TSV-Merge, Iso-C and Iso-CTS in `spectral.py`) are mapped over parameter names
by one driver (`driver.py`), in memory (`merge_state_dicts`) or streamed from safetensors shards
to sharded output (`engine.merge_models`). Data-aware merges
(Fisher, RegMean in `datamerge.py`; AdaMerging in `adamerging.py`) read statistics saved by
`stats.py`; `wemoe.py` turns chosen modules into weight-ensembling mixtures of the experts,
routers trained on unlabelled inputs; `rebasin.py` aligns hidden units for mode connectivity
(`connect.py`: interpolation paths); `ensemble.py` combines outputs of handles at SCORES or
TEXT access. `recipes.py` holds what the `lfm reuse` commands run.
"""

from lfm.reuse import (  # noqa: F401  (registers the methods)
    adamerging,
    datamerge,
    ensemble,
    methods,
    moe,
    rebasin,
    spectral,
    wemoe,
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
