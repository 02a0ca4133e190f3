"""lfm: learning from models.

A toolkit that follows the taxonomy of *Learn From Model Beyond Fine-tuning* (Zheng et al.,
arXiv 2310.08184): model tuning, distillation, reuse, meta learning and editing, each method tagged
by the access to a model it needs (text, scores, embeddings, hidden states, weights).

The names below are imported on first use, so `import lfm.errors` (or the catalogue commands of
the CLI) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "Access": "lfm.levels",
    "LocalModel": "lfm.access",
    "narrow": "lfm.access",
    "AccessError": "lfm.errors",
    "AssetError": "lfm.errors",
    "ConfigError": "lfm.errors",
    "LfmError": "lfm.errors",
    "plan": "lfm.pipeline",
    "run_pipeline": "lfm.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
