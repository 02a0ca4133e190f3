"""Streaming merge engine: safetensors in, sharded safetensors out, one tensor at a time.

Inputs are Hugging Face folders (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) or single `.safetensors` files. Each tensor is read on demand with
`safetensors.safe_open` and merged by the per-tensor driver (`driver.run_merge`, the same code as
`merge_state_dicts`); results are buffered up to `max_shard_size` and written shard by shard with an
index. Peak memory is about one shard of output plus a few tensors per input model, not whole
models. The output folder appears in one rename when everything is written (`atomic_path`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

import lfm
from lfm.config import Config
from lfm.core.io import atomic_path
from lfm.reuse.driver import (
    MergeError,
    OnMissing,
    Reader,
    method_spec,
    plan,
    resolve_config,
    run_merge,
)

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "64MiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", size)
    if not m or m.group(2).upper() not in _UNITS:
        raise MergeError(f"cannot read size {size!r}; write e.g. 2GB, 500MB or 64MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, for a file or a model folder."""
    if path.is_file():
        return {k: path for k in _file_keys(path)}
    if (path / INDEX).is_file():
        wmap = json.loads((path / INDEX).read_text())["weight_map"]
        return {k: path / f for k, f in wmap.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MergeError(f"no safetensors weights in {path}")
    return {k: f for f in files for k in _file_keys(f)}


def _file_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


class SafetensorsReader:
    """A `Reader` over one model on disk; tensors are read only when asked for.

    Args:
        path: a model folder or a single `.safetensors` file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise MergeError(f"no model at {self.path}")
        self.files = weight_files(self.path)
        self.tied = _is_tied(self.path)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        if not self._shapes:  # one pass over the headers of all files
            for file in sorted(set(self.files.values())):
                with safe_open(str(file), framework="pt") as f:
                    self._shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118 (a safe_open handle is not iterable)
        return self._shapes[name]

    def get(self, name: str) -> Tensor:
        # Open the file for each read: a handle kept open maps the whole file, and every page
        # touched stays resident, so memory would grow to the size of the model.
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def _is_tied(path: Path) -> bool:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    text = data.get("text_config", {}) if isinstance(data.get("text_config"), dict) else {}
    return bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


class ShardWriter:
    """Buffers tensors and writes a safetensors shard whenever `max_bytes` would be passed.

    Args:
        folder: the (temporary) output folder.
        max_bytes: the largest shard, in bytes (a single larger tensor gets a shard of its own).
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(
            self.buffer, str(self.folder / f"part-{len(self.shards)}.safetensors"), {"format": "pt"}
        )
        self.shards.append(list(self.buffer))
        self.buffer, self.size = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index."""
        self.flush()
        n = len(self.shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, final in enumerate(names):
            (self.folder / f"part-{i}.safetensors").rename(self.folder / final)
        if n > 1:
            wmap = {k: names[i] for i, keys in enumerate(self.shards) for k in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": wmap}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights) of a folder."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "lfm_merge.json":
            shutil.copy2(f, dst / f.name)


def merge_models(
    method: str,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    base: str | Path | None = None,
    cfg: Config | Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
    max_shard_size: int | str = "2GB",
    on_missing: OnMissing = "error",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge models on disk tensor by tensor and write a loadable Hugging Face folder.

    Args:
        method: a registered merge method (`linear`, `task_arithmetic`, `ties`, `dare_linear`,
            `dare_ties`, `slerp`, `model_stock`).
        models: model folders or `.safetensors` files to merge.
        out: the output folder; it appears only when the merge has succeeded.
        base: the base model (needed by the task-vector methods and Model Stock).
        cfg: the method's config, a mapping of its fields, or None for the paper defaults.
        weights: one weight per model (default 1.0 each).
        max_shard_size: the largest output shard ("2GB", "500MB", or bytes).
        on_missing: "error" (default): tensors absent from some model are an error; "skip": merge
            such a tensor over the models that have it (the template's copy if none has).
        overwrite: replace an existing `out` folder.
        progress: show a progress bar over tensors.

    Returns:
        The output folder.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; choose another folder or pass overwrite=True")
    spec = method_spec(method)
    config = resolve_config(spec, cfg)
    base_reader = SafetensorsReader(base) if base is not None else None
    readers = [open_model(m, base, base_reader) for m in models]
    inputs = plan(base_reader, readers, on_missing)
    template = Path(base) if base is not None else _template_folder(models[0])
    with atomic_path(out) as tmp:
        tmp.mkdir()
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        bar = _bar(f"{spec.name} merge", progress)
        run_merge(spec.name, inputs, config, writer.add, weights, bar)
        writer.close()
        copy_side_files(template if template.is_dir() else template.parent, tmp)
        record = _record(spec.name, config, base, models, weights, on_missing)
        (tmp / "lfm_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def open_model(path: str | Path, base: str | Path | None, base_reader: Reader | None) -> Reader:
    """A reader for a model entry: weights on disk, or a LoRA adapter on top of its base.

    An adapter folder sits on the merge's base (else on the local base its config names);
    mergekit's `base+adapter` string names its base itself.
    """
    from lfm.reuse import lora

    plus = lora.split_plus(path)
    if plus is not None:
        return lora.LoraReader(SafetensorsReader(plus[0]), plus[1], lora.model_type(plus[0]))
    if not lora.is_adapter(path):
        return SafetensorsReader(path)
    if base is None:
        base = lora.adapter_base(path)
        if base is None:
            raise MergeError(
                f"{path} is a LoRA adapter: give the merge a base model to apply it to"
            )
        base_reader = SafetensorsReader(base)
    assert base_reader is not None
    return lora.LoraReader(base_reader, path, lora.model_type(base))


def _template_folder(model: str | Path) -> Path:
    """The folder whose config and tokenizer the output gets (an adapter's base, if an adapter)."""
    from lfm.reuse import lora

    plus = lora.split_plus(model)
    if plus is not None:
        return Path(plus[0])
    if lora.is_adapter(model):
        return Path(lora.adapter_base(model) or model)
    return Path(model)


def _bar(desc: str, enabled: bool) -> Any:
    def wrap(names: Sequence[str]) -> Any:
        return tqdm(names, desc=desc, unit="tensor", disable=not enabled)

    return wrap


def _record(
    method: str, cfg: Config, base: Any, models: Sequence[Any], weights: Any, on_missing: str
) -> dict[str, Any]:
    """The resolved merge, saved beside the weights as `lfm_merge.json`."""
    return {
        "method": method,
        "config": cfg.to_dict(),
        "base": str(base) if base is not None else None,
        "models": [str(m) for m in models],
        "weights": list(weights) if weights is not None else [1.0] * len(models),
        "on_missing": on_missing,
        "lfm_version": getattr(lfm, "__version__", "unknown"),
    }
