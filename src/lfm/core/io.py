"""Files: atomic writes, content hashes with a cache, and tensor files with a format tag.

Every safetensors file lfm writes carries `format` (what it is and the version of its layout) and
JSON metadata; `load_tensors(path, format)` refuses a file of another kind in one line, so a patch
is never read as statistics, nor an unreadable file as anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lfm.core.cache import cache_dir
from lfm.errors import LfmError


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success.

    Works for files and for folders: whatever the block writes at the yielded path replaces
    `target` in one rename, so a crash leaves no half-written output.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    work = tmp / target.name
    try:
        yield work
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            work.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _hash_index_path() -> Path:
    return cache_dir() / "sha256-index.json"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so that a file is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    index_path = _hash_index_path()
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    index[key] = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        write_json(index_path, index)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Any], format: str, **meta: Any) -> Path:
    """Write tensors as one safetensors file, atomically, tagged `format`; `meta` as JSON."""
    from safetensors.torch import save_file

    info = {
        "format": format,
        **{k: json.dumps(v, sort_keys=True, default=str) for k, v in meta.items()},
    }
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), info)
    return Path(path)


def read_meta(path: str | Path, format: str | None = None) -> dict[str, Any]:
    """The metadata of a tagged tensor file (`format` and the JSON values), checked if asked."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # a missing, truncated or foreign file is the same user error
        raise LfmError(f"cannot read {path}: {e}") from None
    got = raw.get("format")
    if format is not None and got != format:
        raise LfmError(f"{path} is not a {format} file (its format tag is {got!r})")
    return {k: v if k == "format" else _json(v) for k, v in raw.items()}


def load_tensors(path: str | Path, format: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and metadata of a file written by `save_tensors` with the same `format`."""
    from safetensors import safe_open

    meta = read_meta(path, format)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise LfmError(f"cannot read {path}: {e}") from None
    return tensors, meta


def _json(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v
