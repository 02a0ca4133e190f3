"""Where lfm keeps converted models and computed statistics (see `lfm.core.cache`)."""

from lfm.core.cache import cache_dir

__all__ = ["cache_dir"]
