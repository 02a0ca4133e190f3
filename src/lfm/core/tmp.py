"""Temporary files beside their target, named after the process that writes them.

Every temporary file or folder lfm writes is `.<target>.pid<N>.<random>.tmp` beside its target,
N the writing process's id. A process killed mid-write leaves one behind; `sweep` removes those
whose writer is no longer running (and never one a live process is still writing), and each
command sweeps before it writes the same target again (`lfm.core.io.atomic_path`, the cache
entries of `lfm.core.cache`, a resumed run directory).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"^\.(?P<target>.+)\.pid(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
REPLACED = "replaced"  # inside a tmp folder: the target it was replacing (see `sweep`)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def make_tmp(target: Path) -> Path:
    """A new empty folder beside `target`, named for this process; abandoned ones are swept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent, target.name)
    prefix = f".{target.name}.pid{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))


def writer_pid(path: Path) -> int | None:
    """The process id in a temporary file's name (None: not one of lfm's temporary names)."""
    m = _NAME.match(path.name)
    return int(m["pid"]) if m else None


def abandoned(folder: Path, target: str | None = None) -> list[Path]:
    """Temporary files and folders in `folder` (of `target` only, if given) whose writer is dead."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        m = _NAME.match(p.name)
        if m and (target is None or m["target"] == target) and not pid_alive(int(m["pid"])):
            out.append(p)
    return out


def sweep(folder: Path, target: str | None = None) -> list[tuple[Path, int]]:
    """Remove the abandoned temporary files in `folder` (of `target` only, if given).

    A process killed between moving an old folder aside and renaming the new one into place
    leaves the old one in its tmp folder (`REPLACED`) and no target: the old one is put back.
    Returns the paths removed with their sizes in bytes.
    """
    removed = []
    for p in abandoned(folder, target):
        old, dest = p / REPLACED, folder / _NAME.match(p.name)["target"]  # type: ignore[index]
        if old.exists() and not dest.exists():
            old.rename(dest)
        size = tree_size(p)
        remove(p)
        removed.append((p, size))
    return removed


def tree_size(path: Path) -> int:
    """Bytes in a file or under a folder (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() or f.is_symlink())


def remove(path: Path) -> None:
    """Delete a file or folder, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
