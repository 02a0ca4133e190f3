"""Safetensors files written tensor by tensor: the header first (the layout is known in advance),
then each tensor's bytes straight from its memory, so writing a model holds a few tensors, not
the model. Shared by the streaming merge (`lfm.reuse.engine`), MoE upcycling and the streaming
patch application of the editing area (`lfm.edit.stream`)."""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import shutil
import struct
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import Tensor

from lfm.errors import LfmError

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
# torch dtype <-> safetensors header dtype
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64",
    torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


class ShardError(LfmError):
    """A tensor arrived out of the planned layout, or writing a shard failed."""


@dataclass(frozen=True)
class Entry:
    """One output tensor as the safetensors header describes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor: its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_header(entries: Sequence[Entry]) -> bytes:
    """The safetensors prefix of a shard: 8-byte little-endian length, then JSON padded to 8."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    start = 0
    for e in entries:
        end = start + e.nbytes
        meta[e.name] = {
            "dtype": DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [start, end],
        }
        start = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _fits(e: Entry, name: str, tensor: Tensor) -> bool:
    return e.name == name and tensor.dtype == e.dtype and tuple(tensor.shape) == e.shape


class ShardWriter:
    """Writes safetensors shards tensor by tensor, in the order of a layout known in advance.

    Each shard's header is written when its first tensor arrives and every tensor's bytes go to the
    file straight from its memory. The writing happens on a background thread, so the next
    tensor is merged while the last one is written (writing the output was about half of a task
    arithmetic merge); at most `depth` tensors wait for it, so memory stays bounded by a few
    tensors. A write error is raised by the next `add`, `flush` or `close`.

    Args:
        folder: the (temporary) output folder.
        entries: every output tensor, in the order `add` will receive them.
        max_bytes: the largest shard, in bytes (a single larger tensor gets a shard of its own).
        depth: tensors that may wait to be written.
    """

    def __init__(self, folder: Path, entries: Sequence[Entry], max_bytes: int, depth: int = 2):
        self.folder = folder
        self.shards = plan_shards(entries, max_bytes)
        n = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.total = sum(e.nbytes for e in entries)
        self._order = iter([(i, e) for i, shard in enumerate(self.shards) for e in shard])
        self._file: IO[bytes] | None = None
        self._shard = -1
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, Tensor] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def add(self, name: str, tensor: Tensor) -> None:
        planned = next(self._order, None)
        if planned is None or not _fits(planned[1], name, tensor):
            want = (
                f"{planned[1].name} {planned[1].dtype} {list(planned[1].shape)}"
                if planned
                else "nothing"
            )
            raise ShardError(f"{name} {tensor.dtype} {list(tensor.shape)} arrived; expected {want}")
        shard = planned[0]
        self._raise_error()
        if self._thread is None:
            raise ShardError("the writer is closed")
        self._queue.put((shard, tensor.detach().contiguous().reshape(-1).view(torch.uint8)))

    def flush(self) -> None:
        """Wait until every tensor given to `add` is written to its file."""
        self._queue.join()
        self._raise_error()
        if self._file is not None:
            self._file.flush()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:  # after an error, only empty the queue
                    shard, data = item
                    if shard != self._shard:
                        self._open(shard)
                    assert self._file is not None
                    self._file.write(data.numpy().data)
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise ShardError(f"writing {self.folder}: {self._error}") from self._error

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _open(self, shard: int) -> None:
        self._close_file()
        self._shard = shard
        self._file = open(self.folder / self.names[shard], "wb")  # noqa: SIM115 (closed by close)
        self._file.write(shard_header(self.shards[shard]))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        """Finish writing, close the last shard and write the index (for several shards)."""
        self._stop()
        self._raise_error()
        self._close_file()
        if next(self._order, None) is not None:
            raise ShardError("the writing ended before every tensor was written")
        if len(self.shards) > 1:
            wmap = {e.name: self.names[i] for i, shard in enumerate(self.shards) for e in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": wmap}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.names

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        self._close_file()


def read_tensor(file: str | Path, key: str) -> Tensor:
    """One tensor of a safetensors file, as stored, in memory of its own (`StoredFile.read`)."""
    return stored_file(file).read(key)


def stored_file(file: str | Path) -> StoredFile:
    """`file` as a `StoredFile`, its header parsed once per version of the file (its path, size
    and modification time)."""
    st = os.stat(file)
    return _stored(str(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)  # headers of up to 256 files (a large model has ~200 shards)
def _stored(path: str, size: int, mtime_ns: int) -> StoredFile:
    return StoredFile(path)


class StoredFile:
    """One safetensors file whose tensors are read one at a time at the offsets of its header.

    The header is parsed once; each `read` is one positioned read of that tensor's bytes into a
    tensor of its own. `safe_open` instead parses the whole header and maps the whole file at
    every opening, so reading every tensor of a file that way takes time in the number of
    tensors squared, and a handle kept open keeps every page it touched resident.

    Args:
        path: a `.safetensors` file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.fstat(f.fileno()).st_size - 8:
                    raise ValueError(f"a header of {n} bytes is longer than the file")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, struct.error, ValueError) as e:
            raise ShardError(f"cannot read {self.path} as safetensors ({e})") from None
        header.pop("__metadata__", None)
        self.start = 8 + n  # where the tensors' bytes begin
        self.entries: dict[str, dict[str, Any]] = header

    def read(self, name: str) -> Tensor:
        """The tensor `name`, as stored (its dtype and shape), on the CPU."""
        e = self.entries.get(name)
        if e is None:
            raise ShardError(f"{self.path} has no tensor {name}")
        begin, end = e["data_offsets"]
        if e["dtype"] not in TORCH_DTYPES:
            raise ShardError(f"{self.path}: {name} has dtype {e['dtype']}, which lfm cannot read")
        dtype = TORCH_DTYPES[e["dtype"]]
        numel = math.prod(e["shape"])
        if numel * dtype.itemsize != end - begin:
            raise ShardError(f"{self.path}: {name}'s header gives {end - begin} bytes for "
                             f"{numel * dtype.itemsize}")  # fmt: skip
        if end - begin > MAPPED_OVER:
            mapped = self._mapped(name, begin, end, dtype, e["shape"])
            if mapped is not None:
                return mapped
        out = torch.empty(e["shape"], dtype=dtype)
        view = out.reshape(-1).view(torch.uint8).numpy().data  # its bytes, writable
        got = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.start + begin)
            while got < len(view):  # one read returns at most ~2 GiB on Linux
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != out.nbytes:
            raise ShardError(
                f"{self.path} is truncated: {name} has {got} of its {out.nbytes} bytes"
            )
        return out

    def _mapped(
        self, name: str, begin: int, end: int, dtype: torch.dtype, shape: list[int]
    ) -> Tensor | None:
        """A large tensor as a private (copy-on-write) map of the file up to its last byte, read
        from the page cache where it is used: no copy and no fresh pages (a tensor over glibc's
        32 MiB mmap threshold would get fresh pages from the kernel at every read). The map
        holds no file descriptor and goes with the tensor; writes to it stay in this process.
        None where its bytes are not aligned to its dtype in the file."""
        offset = self.start + begin
        if offset % dtype.itemsize:
            return None
        have = os.stat(self.path).st_size - offset
        if have < end - begin:
            raise ShardError(f"{self.path} is truncated: {name} has {max(have, 0)} of its "
                             f"{end - begin} bytes")  # fmt: skip
        storage = cast(
            torch.UntypedStorage,
            torch.UntypedStorage.from_file(
                str(self.path), shared=False, nbytes=offset + end - begin
            ),
        )
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]  # contiguous
        return torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape, strides)


MAPPED_OVER = 32 << 20  # bytes: larger tensors are read as maps of the file (`StoredFile._mapped`)


def copy_side_files(src: Path, dst: Path, skip: Collection[str] = ()) -> None:
    """Copy config, generation config and tokenizer files (everything but weights and the
    names in `skip`) of a folder."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in skip:
            shutil.copy2(f, dst / f.name)


def dtype_name(dtype: torch.dtype) -> str:
    """`bfloat16` for `torch.bfloat16`: a dtype as the options and config.json write it."""
    return str(dtype).removeprefix("torch.")


def read_json_object(path: Path, error: type[LfmError] = ShardError) -> dict[str, Any]:
    """A JSON file that holds an object (a model's `config.json`); anything else is one `error`
    line naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data


def write_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """State `dtype` in `folder`'s `config.json`, so that transformers loads the weights in it:
    every `dtype` and `torch_dtype` key the config has (at the top level and in sub-configs
    such as `text_config`), or a top-level `torch_dtype` (which every transformers version
    reads) when it has neither. No `config.json` (a merge of bare safetensors files): nothing."""
    path = folder / "config.json"
    if not path.is_file():
        return
    data = read_json_object(path)
    name = dtype_name(dtype)

    def restate(cfg: dict[str, Any]) -> None:
        cfg.update(dict.fromkeys([k for k in ("dtype", "torch_dtype") if k in cfg], name))
        for sub in cfg.values():
            if isinstance(sub, dict):
                restate(sub)

    restate(data)
    if not {"dtype", "torch_dtype"} & set(data):
        data["torch_dtype"] = name
    path.write_text(json.dumps(data, indent=2) + "\n")
