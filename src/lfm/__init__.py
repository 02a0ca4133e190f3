"""lfm: learning from models.

A toolkit that follows the taxonomy of *Learn From Model Beyond Fine-tuning* (Zheng et al.,
arXiv 2310.08184): model tuning, distillation, reuse, meta learning and editing, each method tagged
by the access to a model it needs (text, scores, embeddings, hidden states, weights).
"""

from lfm.access import Access, LocalModel, narrow
from lfm.errors import AccessError, AssetError, ConfigError, LfmError

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`lfm.plan(...)` and `lfm.run_pipeline(...)` without importing every area up front."""
    if name in ("plan", "run_pipeline"):
        import lfm.pipeline

        return getattr(lfm.pipeline, name)
    raise AttributeError(f"module 'lfm' has no attribute {name!r}")


__all__ = [
    "Access",
    "AccessError",
    "AssetError",
    "ConfigError",
    "LfmError",
    "LocalModel",
    "__version__",
    "narrow",
    "plan",
    "run_pipeline",
]
