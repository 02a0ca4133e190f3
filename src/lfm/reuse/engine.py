"""Streaming merge engine: safetensors in, sharded safetensors out, one tensor at a time.

Inputs are Hugging Face folders (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) or single `.safetensors` files. Each tensor is read on demand at
its header's offset (`lfm.core.shards.read_tensor`) and merged by the per-tensor driver
(`driver.run_merge`, the same code as `merge_state_dicts`). The output layout (names, dtypes,
shapes, shards of at most `max_shard_size`) is known from the template's headers before anything
is merged, so each shard's safetensors header is written first and every merged tensor goes
straight to its file: peak memory is a few tensors per input model, whatever the size of the
model or of the shards. The output folder appears in one rename when everything is written
(`atomic_path`).

Tensors are read on the CPU; `merge_models(..., device=...)` (the CLI's `--device`) runs each
tensor's merge arithmetic there (`driver.merge_one`) and writes the result from the CPU.
`merge_models(..., dtype=...)` (the CLI's `--dtype`, a mergekit plan's `out_dtype`) writes every
floating tensor in that dtype, and says so in the output's `config.json`.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from lfm.config import Config
from lfm.core.io import atomic_path, model_files
from lfm.core.shards import (
    INDEX,
    TORCH_DTYPES,
    Entry,
    ShardWriter,
    copy_side_files,
    read_tensor,
    stored_file,
    write_config_dtype,
)
from lfm.reuse.driver import (
    MergeError,
    OnMissing,
    Reader,
    dtype_name,
    kernel_spec,
    plan,
    run_merge,
)
from lfm.reuse.gguf import is_gguf, write_side_files

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
    files = model_files(path)
    if not files:
        raise MergeError(f"no safetensors weights in {path}")
    return {k: f for f in files for k in _file_keys(f)}


def _file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # not a safetensors file, or a truncated one: the same user error
        raise MergeError(f"cannot read {path} as safetensors: {e}") from None


class SafetensorsReader:
    """A `Reader` over one model on disk; tensors are read only when asked for.

    Args:
        path: a model folder or a single `.safetensors` file.
    """

    concurrent = True  # `get` may be called from several threads at once (one read per call)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise MergeError(f"no model at {self.path}")
        self.files = weight_files(self.path)
        self.tied = _is_tied(self.path)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, header dtype)

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        code = self._header(name)[1]
        if code not in TORCH_DTYPES:
            raise MergeError(f"{self.files[name]}: {name} has dtype {code}, which lfm cannot merge")
        return TORCH_DTYPES[code]

    def _header(self, name: str) -> tuple[tuple[int, ...], str]:
        if not self._meta:  # one pass over all headers, parsed once and kept for `get`
            meta = {}  # filled whole before it is kept: other threads may read it meanwhile
            for file in sorted(set(self.files.values())):
                for k, e in stored_file(file).entries.items():
                    meta[k] = (tuple(e["shape"]), e["dtype"])
            self._meta = meta
        return self._meta[name]

    def get(self, name: str) -> Tensor:
        return read_tensor(self.files[name], name)


def _is_tied(path: Path) -> bool:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    text = data.get("text_config", {}) if isinstance(data.get("text_config"), dict) else {}
    return bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


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
    allow_nonfinite: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Merge models on disk tensor by tensor and write a loadable Hugging Face folder.

    Args:
        method: a registered merge method (`linear`, `task_arithmetic`, `ties`, `dare_linear`,
            `dare_ties`, `breadcrumbs`, `della`, `tsv_merge`, `iso_c`, `iso_cts`, `slerp`,
            `model_stock`, `fisher`, `regmean`, `adamerging`, ...: `lfm methods` lists them).
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
        allow_nonfinite: merge NaN and infinite values; by default a NaN or infinity in a tensor
            that is merged, or in a merged tensor, is a `MergeError` and nothing is written.
        device: where the merge arithmetic runs (cpu, cuda, cuda:N, mps, auto or a
            `torch.device`): each tensor's inputs are read on the CPU, moved there and merged,
            and the result is moved back to the CPU to be written (`chosen_device`; the kernels of
            `driver.CPU_KERNELS` stay on the CPU). None: the device chosen for the process
            (`lfm.core.placement`, the CLI's `--device`), else the CPU. A device this machine
            lacks is an `LfmError`.
        dtype: the dtype the output's floating tensors are written in (float32, bfloat16 or
            float16, `output_dtype`); integer and boolean tensors keep theirs, and the written
            `config.json` states it (`write_config_dtype`). The merge arithmetic is the same
            (float32 or wider); each result is cast to it, and a value that overflows it (1e5 in
            float16) is a `MergeError` unless `allow_nonfinite`. None: each tensor in the
            template's dtype, the config as the template's.

    Returns:
        The output folder.
    """
    out = Path(out)
    at = chosen_device(device)  # a device this machine lacks: refused before anything is read
    cast = output_dtype(dtype)  # so is a dtype that is not one
    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; choose another folder or pass overwrite=True")
    spec = kernel_spec(method)
    config = spec.resolve(cfg)
    base_reader = _base_reader(base) if base is not None else None
    readers = [open_model(m, base, base_reader) for m in models]
    inputs = plan(base_reader, readers, on_missing)
    template = Path(base) if base is not None else _template_folder(models[0])
    with atomic_path(out, replace=overwrite) as tmp:  # a rival merge into `out` is refused
        tmp.mkdir()
        tmpl = inputs.template
        entries = [Entry(n, _written(tmpl.dtype(n), cast), tmpl.shape(n)) for n in inputs.names]
        with ShardWriter(tmp, entries, parse_size(max_shard_size)) as writer:
            bar = _bar(f"{spec.name} merge", progress)
            run_merge(spec, inputs, config, writer.add, weights, bar,
                      allow_nonfinite=allow_nonfinite, device=at, dtype=cast)  # fmt: skip
            writer.close()
        if is_gguf(template):  # its config and tokenizer, as transformers reads them
            write_side_files(template, tmp)
        else:
            copy_side_files(
                template if template.is_dir() else template.parent, tmp, {"lfm_merge.json"}
            )
        if cast is not None:
            write_config_dtype(tmp, cast)
        record = _record(spec.name, config, base, models, weights, on_missing)
        if cast is not None:
            record["dtype"] = dtype_name(cast)
        (tmp / "lfm_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype a merge writes its floating tensors in: float32, bfloat16 or float16 (or bf16,
    fp16, fp32, or the `torch.dtype`), read by `lfm.core.placement.resolve_dtype`; None: None
    (the template's dtypes). `auto` is refused: what a file holds should not depend on the
    machine that wrote it. Any other name is a one-line `MergeError`."""
    from lfm.core import placement
    from lfm.errors import LfmError

    if dtype is None:
        return None
    hint = "name float32, bfloat16 or float16"
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        raise MergeError(f"a merge's output dtype cannot be auto: {hint}")
    try:
        return placement.resolve_dtype(dtype, torch.device("cpu"))
    except LfmError:
        raise MergeError(f"a merge cannot write its output in {dtype!r}: {hint}") from None


def _written(stored: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as `stored` is written in: `cast` if it is floating."""
    return cast if cast is not None and stored.is_floating_point else stored


def chosen_device(device: str | torch.device | None = None) -> torch.device | None:
    """The device a streamed merge (or `rebasin_files`) computes on: `device` resolved
    (`lfm.core.placement.resolve_device`; a device this machine lacks is an `LfmError`), else the
    process placement's device when one was chosen (`--device`), else None: on the CPU, where the
    tensors are read, as without the option."""
    from lfm.core import placement

    if device is not None:
        return placement.resolve_device(device)
    at = placement.current()
    return at.device if at.device_chosen else None


def _base_reader(base: str | Path) -> Reader:
    """The base model's reader: a GGUF file's, else its safetensors'."""
    from lfm.reuse.gguf import open_gguf

    return open_gguf(base) if is_gguf(base) else SafetensorsReader(base)


def open_model(path: str | Path, base: str | Path | None, base_reader: Reader | None) -> Reader:
    """A reader for a model entry: weights on disk, or a LoRA adapter on top of its base.

    An adapter folder sits on the merge's base (else on the local base its config names);
    mergekit's `base+adapter` string names its base itself.
    """
    from lfm.reuse import lora
    from lfm.reuse.gguf import open_gguf

    if is_gguf(path):
        return open_gguf(path)
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


def _version() -> str:
    try:
        return importlib.metadata.version("lfm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


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
        "lfm_version": _version(),
    }
