"""Run directories (see `lfm.core.runs`): every command that produces something writes it under
`runs/<YYYYmmdd-HHMMSS>-<name>/` with a `manifest.json`."""

from lfm.core.runs import Run, versions

__all__ = ["Run", "versions"]
