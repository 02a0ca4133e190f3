"""Where lfm keeps converted models and computed statistics.

`$LFM_CACHE` moves it; the default is `~/.cache/lfm`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("LFM_CACHE") or Path.home() / ".cache" / "lfm").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
