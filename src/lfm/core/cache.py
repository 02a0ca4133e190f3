"""Where lfm keeps converted models and computed statistics, and how it trusts them.

`$LFM_CACHE` moves it; the default is `~/.cache/lfm`. Every entry is a folder

    <cache>/<kind>/<key>/
        lfm-entry.json   the marker: kind, key, the parameters that made it, each file's
                         size and SHA-256
        ...              what the entry holds

written in a temporary folder and renamed into place in one step, marker included, so an entry
is whole or absent. `read` checks an entry before anyone uses it: the marker's parameters against
the caller's, each file's size (a truncated file) and hash (a changed one; files over
`REHASH_OVER` bytes are hashed again only when their size or mtime differ from the marker's), then
the caller's own `check` (shapes, finite values). A failed check is one warning line naming the
entry and the reason; the entry is moved aside and the caller rebuilds it (`get`). `lfm cache`
lists the entries and `lfm cache --clear` removes only folders that carry a marker.

Two processes building the same entry both build it; the first rename wins and the second keeps
the winner's entry when it is sound. Neither reads a half-written one: a folder appears whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm.core.tmp import make_tmp, remove, sweep, tree_size, writer_pid
from lfm.errors import LfmError

MARKER = "lfm-entry.json"
REHASH_OVER = 64 << 20  # bytes; a larger file is re-hashed only when its size or mtime changed


class BadEntry(Exception):
    """Raised by a `check`: the entry is unusable, for the reason given."""


def cache_dir() -> Path:
    root = Path(os.environ.get("LFM_CACHE") or Path.home() / ".cache" / "lfm").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def entry_dir(kind: str, key: str) -> Path:
    """The folder of entry `key` of `kind` (it may not exist)."""
    return cache_dir() / kind / key


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


Check = Callable[[Path], None]


def read(kind: str, key: str, params: dict[str, Any], check: Check | None = None) -> Path | None:
    """The folder of a sound entry; None if there is none (a damaged one is reported and moved
    aside, so the caller builds it again).

    Args:
        kind: the kind of entry (`edit-stats`, `models` ...), a folder of the cache.
        key: its name within `kind`.
        params: the parameters that make it; an entry made with others is not used.
        check: `check(folder)` raises `BadEntry` if what the files hold is wrong.
    """
    path = entry_dir(kind, key)
    if not path.exists():
        return None
    try:
        verify(path, params, check)
    except BadEntry as e:
        if _sound(path, params, check):  # another process replaced it while we read it
            return path
        _warn(f"cache entry {kind}/{key} fails its check ({e}); rebuilding it")
        discard(path)
        return None
    return path


def verify(path: Path, params: dict[str, Any] | None = None, check: Check | None = None) -> None:
    """Raise `BadEntry` unless the entry at `path` is whole, unchanged and made with `params`."""
    marker = _marker(path)
    if params is not None and marker.get("params") != _plain(params):
        raise BadEntry(f"made with {marker.get('params')}, not {_plain(params)}")
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        raise BadEntry(f"{MARKER} lists no files")
    for rel, rec in files.items():
        _verify_file(path / rel, rel, rec)
    if check is not None:
        check(path)


def _marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise BadEntry(f"no {MARKER}") from None
    except (OSError, ValueError) as e:
        raise BadEntry(f"unreadable {MARKER}: {e}") from None
    if not isinstance(marker, dict):
        raise BadEntry(f"{MARKER} is not an object")
    return marker


def _verify_file(file: Path, rel: str, rec: dict[str, Any]) -> None:
    try:
        st = file.stat()
    except OSError:
        raise BadEntry(f"{rel} is missing") from None
    if st.st_size != rec.get("size"):
        raise BadEntry(f"{rel} has {st.st_size} bytes, not {rec.get('size')} (truncated?)")
    if st.st_size > REHASH_OVER and st.st_mtime_ns == rec.get("mtime_ns"):
        return  # unchanged since it was written: hashing gigabytes on every load buys nothing
    if sha256_of(file) != rec.get("sha256"):
        raise BadEntry(f"{rel} does not match its SHA-256")


def write(
    kind: str, key: str, params: dict[str, Any], build: Callable[[Path], Any],
    replace: bool = False, check: Check | None = None,
) -> Path:  # fmt: skip
    """Build an entry in a temporary folder, add its marker and rename it into place.

    Args:
        kind, key, params: as for `read`.
        build: `build(folder)` writes the entry's files into the empty `folder`.
        replace: replace a sound entry already there (for an entry that grows, the hash memo);
            False: keep it (another process built it first) and drop this one.
        check: as for `read`, run on the new entry before it is renamed into place; a failure
            is an `LfmError` (what was built is wrong, so nothing is cached).
    """
    target = entry_dir(kind, key)
    tmp = make_tmp(target)
    try:
        work = tmp / key
        work.mkdir()
        build(work)
        _write_marker(work, kind, key, params)
        if check is not None:
            try:
                check(work)
            except BadEntry as e:
                raise LfmError(f"cache entry {kind}/{key} was built wrong ({e})") from None
        return _publish(work, target, params, replace)
    finally:
        remove(tmp)


def _write_marker(folder: Path, kind: str, key: str, params: dict[str, Any]) -> None:
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        st = f.stat()
        rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(f)}
        files[f.relative_to(folder).as_posix()] = rec
    marker = {"kind": kind, "key": key, "params": _plain(params), "files": files,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}  # fmt: skip
    (folder / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _publish(work: Path, target: Path, params: dict[str, Any], replace: bool) -> Path:
    """Rename `work` to `target`; a sound entry already there is kept unless `replace`."""
    for _ in range(5):  # each round, another process may have moved an entry in or out
        try:
            os.rename(work, target)  # fails if `target` is a folder with files in it
            return target
        except OSError:
            if not replace and _sound(target, params):
                return target
            discard(target)
    raise LfmError(f"cannot put the cache entry {target} in place: other processes keep writing it")


def _sound(path: Path, params: dict[str, Any], check: Check | None = None) -> bool:
    try:
        verify(path, params, check)
    except BadEntry:
        return False
    return True


def discard(path: Path) -> None:
    """Remove an entry: first moved aside (one rename), so no one reads it half-deleted."""
    aside = make_tmp(path)
    with contextlib.suppress(FileNotFoundError):  # another process removed it first
        path.rename(aside / "entry")
    remove(aside)


def get(
    kind: str, key: str, params: dict[str, Any], build: Callable[[Path], Any],
    check: Check | None = None,
) -> Path:  # fmt: skip
    """The folder of a sound entry: the cached one, else built now (`write`)."""
    found = read(kind, key, params, check)
    return found if found is not None else write(kind, key, params, build, check=check)


# ---------------------------------------------------------------------------------------------
# Listing and clearing.


@dataclass(frozen=True)
class Item:
    """Something in the cache folder: an entry (`kind`/`key`) or anything else."""

    path: Path
    size: int
    entry: bool  # a folder with an lfm marker
    note: str  # for an entry its creation time; else why it is not one


def scan() -> list[Item]:
    """Every entry in the cache, and every other file or folder there with what it is."""
    root = cache_dir()
    out = []
    for top in sorted(root.iterdir()):
        if top.is_dir() and not top.is_symlink() and writer_pid(top) is None:
            out += [_item(p) for p in sorted(top.iterdir())]
        else:
            out.append(_item(top))
    return out


def _item(path: Path) -> Item:
    size = tree_size(path)
    pid = writer_pid(path)
    if pid is not None:
        return Item(path, size, False, f"temporary, written by process {pid}")
    try:
        marker = _marker(path) if path.is_dir() else None
    except BadEntry:
        marker = None
    if marker is None:
        return Item(path, size, False, "no lfm marker (not written by lfm, or by an older version)")
    return Item(path, size, True, str(marker.get("created", "")))


def clear() -> tuple[list[Item], list[Item]]:
    """Remove the entries lfm wrote and the temporary files of dead lfm processes.

    Returns (removed, kept): what was removed, and what was left in place (with why).
    """
    root = cache_dir()
    swept = [Item(p, size, False, "abandoned temporary file") for p, size in _sweep_all(root)]
    removed, kept = [], []
    for item in scan():
        if item.entry:
            discard(item.path)
            removed.append(item)
        else:
            kept.append(item)
    for top in root.iterdir():  # kind folders left empty
        if top.is_dir() and not top.is_symlink():
            with contextlib.suppress(OSError):
                top.rmdir()
    return swept + removed, kept


def _sweep_all(root: Path) -> list[tuple[Path, int]]:
    out = sweep(root)
    for top in root.iterdir():
        if top.is_dir() and not top.is_symlink():
            out += sweep(top)
    return out


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """`params` as JSON gives it back (tuples as lists), so a marker compares equal."""
    return dict(json.loads(json.dumps(params, sort_keys=True, default=str)))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
