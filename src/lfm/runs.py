"""Run directories: every command that produces something writes it under

    runs/<YYYYmmdd-HHMMSS>-<name>/
        manifest.json   resolved config, package versions, input hashes, metrics, status
        ...             outputs, each written atomically

so that a run can be reproduced, compared and resumed.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Any

from lfm.config import Config
from lfm.core.io import atomic_path, file_sha256, write_json
from lfm.errors import LfmError

PACKAGES = ("lfm", "torch", "transformers", "accelerate", "peft", "safetensors", "numpy")


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Run:
    """A run directory and its manifest.

    Args:
        name: a short name for the job (`tune-lora`, `merge-ties`).
        config: the resolved config (a `Config` or a plain mapping).
        inputs: files the run reads; their SHA-256 goes into the manifest.
        root: where run directories live (default `runs/`).
        path: reuse this directory (to resume) instead of creating a new one; its manifest's
            metrics and outputs are kept, and its config must equal `config`.
    """

    def __init__(
        self,
        name: str,
        config: Config | dict[str, Any] | None = None,
        inputs: dict[str, str | Path] | None = None,
        root: str | Path = "runs",
        path: str | Path | None = None,
    ):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = Path(path) if path else _unique(Path(root) / f"{stamp}-{name}")
        self.path.mkdir(parents=True, exist_ok=True)
        cfg = config.to_dict() if isinstance(config, Config) else dict(config or {})
        self.manifest: dict[str, Any]
        previous = self._previous()
        if previous is not None:  # resuming: keep what earlier attempts recorded
            if previous.get("config") != cfg:
                raise LfmError(f"cannot resume {self.path}: its manifest holds another config")
            self.manifest = previous
            self.manifest["status"] = "running"
            self.manifest.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self.save()
            return
        self.manifest = {
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "config": cfg,
            "config_class": type(config).__name__ if isinstance(config, Config) else None,
            "versions": versions(),
            "inputs": {
                k: {"path": str(p), "sha256": file_sha256(p)} for k, p in (inputs or {}).items()
            },
            "metrics": {},
            "outputs": [],
            "status": "running",
        }
        self.save()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def _previous(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.path / "manifest.json").read_text()))
        except (OSError, ValueError):
            return None

    def save(self) -> None:
        write_json(self.path / "manifest.json", self.manifest)

    def log(self, **metrics: Any) -> None:
        """Record metrics (they replace earlier values of the same name)."""
        self.manifest["metrics"].update(metrics)
        self.save()

    def output(self, relpath: str) -> AbstractContextManager[Path]:
        """`with run.output("model") as tmp:` write to `tmp`; it appears at the path on success."""
        if relpath not in self.manifest["outputs"]:
            self.manifest["outputs"].append(relpath)
        return atomic_path(self.path / relpath)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.manifest["status"] = (
            "done" if exc_type is None else f"failed: {exc_type.__name__}: {exc}"
        )
        self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    i = 1
    while path.with_name(f"{path.name}-{i}").exists():
        i += 1
    return path.with_name(f"{path.name}-{i}")
