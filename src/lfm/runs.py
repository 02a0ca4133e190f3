"""Run directories (see `lfm.core.runs`): every command that produces something writes it under
`runs/<YYYYmmdd-HHMMSS>-<name>/` with a `manifest.json`."""

from collections.abc import Mapping
from pathlib import Path

from lfm.core.runs import Run, versions

__all__ = ["Run", "on_disk", "versions"]


def on_disk(paths: Mapping[str, str | Path | None]) -> dict[str, str | Path]:
    """The entries of `paths` that name a file or folder, as a run's `inputs` (an option left out,
    a hub name or a URL has nothing to hash; a missing file is the command's error to report)."""
    return {k: p for k, p in paths.items() if p is not None and Path(p).exists()}
