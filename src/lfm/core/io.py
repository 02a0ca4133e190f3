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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lfm.core import cache
from lfm.core.cache import sha256_of
from lfm.core.tmp import REPLACED, make_tmp
from lfm.errors import LfmError


@contextmanager
def atomic_path(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success.

    Works for files and for folders: whatever the block writes at the yielded path replaces
    `target` in one rename, so a crash leaves no half-written output. The temporary folder is
    named for this process (`lfm.core.tmp`): one a killed process left is removed the next time
    `target` is written.

    Args:
        target: the file or folder to write.
        replace: replace an existing `target`; False: a `target` that exists when the block ends
            (another process wrote it meanwhile) is kept and this is an `LfmError`.
    """
    target = Path(target)
    tmp = make_tmp(target)
    work = tmp / target.name
    try:
        yield work
        if target.exists() and work.exists() and target.is_dir() != work.is_dir():
            have, made = ("a folder", "a file") if target.is_dir() else ("a file", "a folder")
            raise LfmError(f"{target} is {have}, and what is written there is {made}; give "
                           "another path (nothing was changed)")  # fmt: skip
        if not replace:
            _publish_new(work, target)
        elif target.is_dir() and not target.is_symlink():
            # the old folder waits in `tmp` (put back by a sweep if we die before the next
            # rename); another writer may have moved it first
            with contextlib.suppress(FileNotFoundError):
                target.rename(tmp / REPLACED)
            work.rename(target)
        else:
            os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish_new(work: Path, target: Path) -> None:
    """Move `work` to `target` only if `target` does not exist, atomically."""
    try:
        if work.is_dir():
            os.rename(work, target)  # refuses a target folder that is not empty, or a file
            return
        os.link(work, target)  # refuses any existing target
    except OSError as e:
        if not target.exists():
            raise
        raise LfmError(
            f"{target} was written by another process meanwhile; it is kept ({e.strerror})"
        ) from None


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) so that a file is hashed once.

    Each file's hash is a cache entry of its own (`lfm.core.cache`, kind `hashes`, its key a
    digest of "path:size:mtime_ns", which the entry's parameters hold in full), so processes
    hashing different files never write the same entry. A changed file has another key and is
    hashed again. Files under `MEMO_OVER` bytes are hashed every time: that is quicker than
    writing the entry. A cache that cannot be written (read-only, or contended) costs only a
    re-hash next time.
    """
    path = Path(path).resolve()
    st = path.stat()
    if st.st_size < MEMO_OVER:
        return sha256_of(path, chunk)
    memo = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    key, params = hashlib.sha256(memo.encode()).hexdigest()[:32], {"file": memo}
    folder = cache.read(HASHES, key, params)
    if folder is not None:
        with contextlib.suppress(OSError):  # removed by another process after the check
            return (folder / "sha256").read_text().strip()
    digest = sha256_of(path, chunk)
    with contextlib.suppress(OSError, LfmError):
        cache.write(HASHES, key, params, lambda f: (f / "sha256").write_text(digest + "\n"))
    return digest


MEMO_OVER = 1 << 20  # bytes: smaller files are not remembered
HASHES = "hashes"  # the cache kind of `file_sha256`'s entries


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


def model_files(folder: str | Path) -> list[Path]:
    """The safetensors files that hold a model folder's weights, sorted.

    `save_pretrained` names them `model.safetensors` or `model-0000i-of-0000n.safetensors`; when
    such files exist only they count, so files beside them (the `edit-undo.safetensors` that
    `lfm edit patch-apply` leaves, statistics, heads) are never read as weights. A folder with no
    `model*.safetensors` gives all its `.safetensors` files."""
    folder = Path(folder)
    named = sorted(folder.glob("model*.safetensors"))
    return named or sorted(folder.glob("*.safetensors"))


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


def nonfinite(t: Any) -> bool:
    """Whether a floating tensor holds a NaN or an infinity (integer tensors never do).

    One min/max pass, no mask as large as the tensor: NaN propagates through both, an infinity
    shows in one of them.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return False
    import torch

    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)))


def check_finite(
    tensors: Iterable[tuple[str, Any]], where: str, hint: str, error: type[LfmError] = LfmError
) -> None:
    """A one-line `error` naming the first tensors (up to 3) that hold NaN or infinity.

    Args:
        tensors: (name, tensor) pairs; only the floating ones are checked.
        where: what holds them ("model a/" or "the merged model").
        hint: what to do, appended to the message.
        error: the `LfmError` subclass raised.
    """
    bad = [name for name, t in tensors if nonfinite(t)]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise error(f"{where} has NaN or infinite values in {', '.join(bad[:3])}{more}; {hint}")


def stored_dtypes(files: Iterable[str | Path]) -> dict[str, str]:
    """Tensor name -> the dtype its safetensors header gives ("F32", "BF16", "I32" ...)."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})  # noqa: SIM118
        except Exception as e:  # a truncated or foreign file is the same user error
            raise LfmError(f"cannot read {file}: {e}") from None
    return out
