"""Run directories: every command that produces something writes it under

    runs/<YYYYmmdd-HHMMSS>-<name>/
        manifest.json   resolved config, package versions, input hashes, metrics, status
        ...             outputs, each written atomically

so that a run can be reproduced, compared and resumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Any

from lfm.config import Config
from lfm.core import placement
from lfm.core.io import atomic_path, file_sha256, write_json
from lfm.core.plot import curves
from lfm.core.tmp import sweep
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


def _placement() -> dict[str, str]:
    """Where the process puts models, their dtype, and the training autocast (`--device`,
    `--dtype`; "None": no autocast)."""
    at = placement.current()

    def name(t: object) -> str:
        return str(t).removeprefix("torch.")

    return {"device": str(at.device), "dtype": name(at.dtype), "autocast": name(at.autocast)}


class Run:
    """A run directory and its manifest.

    Args:
        name: a short name for the job (`tune-lora`, `merge-ties`).
        config: the resolved config (a `Config` or a plain mapping).
        inputs: files or folders the run reads; their SHA-256 goes into the manifest (a
            folder's is the hash of its files' relative paths and hashes).
        root: where run directories live (default `runs/`).
        path: reuse this directory (to resume) instead of creating a new one; its manifest's
            metrics and outputs are kept, its config must equal `config` and each input it
            recorded must still have the same SHA-256 (a folder may move, not change); the temporary
            files a killed attempt left in it (a half-written checkpoint) are removed.
        parents: ids of the runs whose outputs this run reads (its lineage); None: found from
            `inputs` (an input inside a run directory names that run, see `lineage`).

    A new run directory is created exclusively: two processes starting in the same second get
    two directories, never one.
    """

    def __init__(
        self,
        name: str,
        config: Config | dict[str, Any] | None = None,
        inputs: dict[str, str | Path] | None = None,
        root: str | Path = "runs",
        path: str | Path | None = None,
        parents: list[str] | None = None,
    ):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if path:
            self.path = Path(path)
            self.path.mkdir(parents=True, exist_ok=True)
            sweep(self.path)
        else:
            self.path = _create(Path(root) / f"{stamp}-{name}")
        cfg = config.to_dict() if isinstance(config, Config) else dict(config or {})
        self.manifest: dict[str, Any]
        previous = self._previous()
        if previous is not None:  # resuming: keep what earlier attempts recorded
            if previous.get("config") != cfg:
                raise LfmError(f"cannot resume {self.path}: its manifest holds another config")
            for key, p in (inputs or {}).items():  # a resumed run reads what it first read
                was = previous.get("inputs", {}).get(key, {}).get("sha256")
                if was is not None and was != path_sha256(p):
                    raise LfmError(
                        f"cannot resume {self.path}: {p} has changed since the run began"
                    )
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
            "placement": _placement(),
            "inputs": {
                k: {"path": str(p), "sha256": path_sha256(p)} for k, p in (inputs or {}).items()
            },
            "parents": list(parents if parents is not None else lineage((inputs or {}).values())),
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

    def history(
        self, name: str, values: Sequence[float], steps: Sequence[int] | None = None,
        xlabel: str = "step",
    ) -> None:  # fmt: skip
        """Record the history of one metric (a value per step; `steps` default 1, 2, …) in the
        manifest's `history`, and redraw `curves.png` in the run directory with every recorded
        metric in its own panel. Non-finite values are kept as null in the manifest (JSON has no
        NaN) and left out of the picture."""
        xs = list(range(1, len(values) + 1)) if steps is None else [int(s) for s in steps]
        if len(xs) != len(values):
            raise ValueError(f"history {name}: {len(values)} values for {len(xs)} steps")
        ys = [float(v) for v in values]
        self.manifest.setdefault("history", {})[name] = {
            "step": xs,
            "value": [v if math.isfinite(v) else None for v in ys],
            "xlabel": xlabel,
        }
        self.save()
        drawn = {
            k: {**h, "step": [s for s, v in zip(h["step"], h["value"], strict=True) if v is not None],
                "value": [v for v in h["value"] if v is not None]}
            for k, h in self.manifest["history"].items()
        }  # fmt: skip
        curves(drawn, self.path / "curves.png", title=self.manifest.get("name", ""))
        if "curves.png" not in self.manifest["outputs"]:
            self.manifest["outputs"].append("curves.png")
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

    @property
    def id(self) -> str:
        """The run's id: its directory's name."""
        return self.path.name


def _create(path: Path) -> Path:
    """Make `path`, or `path-1`, `path-2` ... : the first that no one else has made (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        candidate = path if i == 0 else path.with_name(f"{path.name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise LfmError(f"cannot create a run directory beside {path}: too many with that name")


def path_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder: the hash of its files' relative paths and hashes."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a run directory; one-line `LfmError` if there is none or it is damaged."""
    file = Path(path) / "manifest.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise LfmError(f"{path} is not a run directory ({type(e).__name__}: {file})") from None
    if not isinstance(data, dict):
        raise LfmError(f"{file} is not a run manifest")
    return data


def find_run(run_id: str, root: str | Path = "runs") -> Path:
    """The directory of run `run_id` under `root`, nested runs included (or `run_id` itself when
    it is a run directory); a unique part of an id will do."""
    direct = Path(run_id)
    if (direct / "manifest.json").exists():
        return direct
    found = [m.parent for m in Path(root).rglob("manifest.json")]
    hits = [p for p in found if p.name == run_id] or [p for p in found if run_id in p.name]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        names = ", ".join(sorted(p.name for p in hits)[:5])
        raise LfmError(f"run id {run_id!r} is ambiguous under {root}: {names}")
    raise LfmError(f"no run {run_id!r} under {root}; `lfm runs list` shows them")


def list_runs(root: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run under `root` (nested runs of a step included), oldest first."""
    out = []
    for file in sorted(Path(root).rglob("manifest.json")):
        try:
            m = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        out.append({"id": file.parent.name, "path": str(file.parent), **m})
    return sorted(out, key=lambda m: (str(m.get("created", "")), m["path"]))


def ancestry(run_id: str, root: str | Path = "runs") -> list[tuple[int, dict[str, Any]]]:
    """The run and, depth first, the runs that produced its inputs: (depth, manifest) pairs; a
    parent no longer on disk is listed with status `missing`."""
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[Path] = set()

    def visit(path: Path, depth: int) -> None:
        if path in seen:
            return
        seen.add(path)
        m = read_manifest(path)
        out.append((depth, {"id": path.name, "path": str(path), **m}))
        for parent in m.get("parents", []):
            try:  # a parent is a sibling (a pipeline's steps), else anywhere under `root`
                found = find_run(str(path.parent / parent), root)
            except LfmError:
                try:
                    found = find_run(parent, root)
                except LfmError:
                    out.append((depth + 1, {"id": parent, "status": "missing"}))
                    continue
            visit(found, depth + 1)

    visit(find_run(run_id, root), 0)  # the run itself must exist; a parent may be gone
    return out


def lineage(paths: Any) -> list[str]:
    """Ids of the run directories that hold any of `paths` (an output of an earlier run)."""
    out: list[str] = []
    for p in paths:
        path = Path(p).resolve()
        for folder in [path, *path.parents]:
            if (folder / "manifest.json").is_file():
                if folder.name not in out:
                    out.append(folder.name)
                break
    return out
