"""A weight patch applied to a model folder on disk, one tensor at a time (`lfm edit patch-apply
--stream`): for a model larger than memory, or one too large to load twice.

The model is never loaded. The patch's fingerprint is checked against the edited tensors read
from the folder's safetensors files (cast to the dtype the model would load in, as
`load_model` would give them), before anything is written; then every tensor is read, cast,
changed when the patch edits it (W + ΔW, in the dtype of the written weights, as
`Patch.apply` adds it) and handed to a `ShardWriter`, so memory holds a few tensors whatever the
size of the model. The output folder is what `patch-apply` without `--stream` writes: the
weights in that dtype, `config.json` saying so, the tokenizer and other side files, and
`edit-undo.safetensors` with the original tensors for `patch-revert`. It appears in one rename
when everything is written.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lfm.core.io import atomic_path, model_files, nonfinite, save_tensors
from lfm.core.shards import (
    TORCH_DTYPES,
    Entry,
    ShardWriter,
    copy_side_files,
    read_tensor,
    write_config_dtype,
)
from lfm.edit import progress
from lfm.edit.patch import UNDO_FILE, UNDO_FORMAT, Patch, fingerprint_of, model_type
from lfm.edit.site import is_conv1d
from lfm.errors import LfmError

SHARD = 5 * 10**9  # the largest shard written, as `save_pretrained` writes them


def stream_apply(
    patch: Patch,
    folder: str | Path,
    out: str | Path,
    skeleton: nn.Module,
    dtype: torch.dtype,
) -> Path:
    """Write the model folder `folder` with `patch` applied to `out`, tensor by tensor.

    `skeleton` is the model's modules on the meta device (`lfm.assets.model_skeleton`): it says
    each edited module's orientation (GPT-2's `Conv1D` stores (in, out)) and the model type the
    fingerprint starts from. Every floating tensor is written in `dtype`, the others as stored.
    A weight with NaN or infinity, a module the folder lacks and weights the patch was not made
    from are one-line errors, and nothing is written."""
    folder = Path(folder)
    files = model_files(folder)
    if not files:
        raise LfmError(
            f"{folder} holds no safetensors weights; --stream reads them tensor by tensor "
            "(drop --stream to load the model whole)"
        )
    where = _locations(files, dtype)
    keys = {m: _key(m, where, skeleton, patch) for m in patch.modules}

    def read(module: str) -> torch.Tensor:
        return read_tensor(where[keys[module]][0], keys[module]).to(dtype)

    patch.check_base(fingerprint_of(model_type(skeleton), patch.modules, read))
    deltas = {keys[d.module]: d for d in patch.deltas}
    entries = [e for _, e in where.values()]
    originals: dict[str, torch.Tensor] = {}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        with (
            ShardWriter(tmp, entries, SHARD) as writer,
            progress.bar(total=writer.total, unit="B", unit_scale=True, desc="patch-apply") as bar,
        ):
            for e in entries:
                t = read_tensor(where[e.name][0], e.name).to(e.dtype)
                if nonfinite(t):
                    raise LfmError(
                        f"{folder}: the weight {e.name} holds NaN or infinity; the model is damaged"
                    )
                if e.name in deltas:
                    d = deltas[e.name]
                    originals[d.module] = t.clone()
                    dw = d.matrix().to(t.dtype)
                    t += dw.T if is_conv1d(skeleton.get_submodule(d.module)) else dw
                writer.add(e.name, t)
                bar.update(e.nbytes)
            writer.close()
        copy_side_files(folder, tmp)
        write_config_dtype(tmp, dtype)
        save_tensors(tmp / UNDO_FILE, originals, UNDO_FORMAT)
    return Path(out)


def _locations(files: Sequence[Path], dtype: torch.dtype) -> dict[str, tuple[Path, Entry]]:
    """Tensor name -> the file holding it and the tensor as written (floating ones in `dtype`,
    the others as stored), in the files' order and each file's header order."""
    where: dict[str, tuple[Path, Entry]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    sl = h.get_slice(k)
                    code = sl.get_dtype()
                    written = dtype if code.startswith(("F", "BF")) else TORCH_DTYPES[code]
                    where[k] = (f, Entry(k, written, tuple(sl.get_shape())))
        except Exception as e:  # a truncated or foreign file is the same user error
            raise LfmError(f"cannot read {f} as safetensors: {e}") from None
    return where


def _key(module: str, where: Collection[str], skeleton: nn.Module, patch: Patch) -> str:
    """The stored name of `module`'s weight: its full name, or the name without the base
    model's prefix (`transformer.h.0...` stored as `h.0...`), as transformers reads either."""
    prefix = getattr(skeleton, "base_model_prefix", "")
    for key in (f"{module}.weight", f"{module.removeprefix(prefix + '.')}.weight"):
        if key in where:
            return key
    raise patch.lacking(module)
