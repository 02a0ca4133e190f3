"""GGUF files as merge inputs: each tensor dequantised when the merge asks for it.

    lfm reuse merge plan.yaml --out merged/      # plan: models: [a.gguf, b.gguf], base: base.gguf

A `GgufReader` is a merge `Reader` over one GGUF file (llama.cpp's format, any quantisation the
`gguf` package dequantises): its tensors carry the names transformers gives them (the name map
transformers builds for the architecture, from the file's own config), their shapes come from the
file's tensor table, and `get(name)` dequantises that one tensor to float32 (with transformers'
per-architecture fixes, e.g. Llama's query and key rows put back in Hugging Face's order). The
file is memory-mapped, so a merge of GGUF inputs streams tensor by tensor as one of safetensors
does. A merged folder whose template is a GGUF file gets the config and tokenizer transformers reads
from it. Architectures are those transformers loads from GGUF.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lfm.reuse.driver import MergeError


def is_gguf(path: str | Path) -> bool:
    """A `.gguf` file."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def _fail(path: Path, e: Exception) -> MergeError:
    return MergeError(f"cannot read {path} as a GGUF model ({type(e).__name__}: {e})")


def _stamp(path: str | Path) -> tuple[Path, int, int]:
    """The file with its modification time and size: a cache key that a rewrite changes."""
    p = Path(path).resolve()
    st = p.stat()
    return p, st.st_mtime_ns, st.st_size


def gguf_config(path: str | Path) -> Any:
    """The transformers config of a GGUF file (as `AutoConfig.from_pretrained(..., gguf_file=)`),
    read once per version of the file (parsing its metadata takes seconds)."""
    return _config(*_stamp(path))


def open_gguf(path: str | Path) -> GgufReader:
    """A `GgufReader` for the file, opened once per version of it: checking a merge plan and
    merging it read the same metadata and build the same name map."""
    return _reader(*_stamp(path))


@functools.lru_cache(maxsize=8)
def _reader(path: Path, _mtime: int, _size: int) -> GgufReader:
    return GgufReader(path)


@functools.lru_cache(maxsize=8)
def _config(path: Path, _mtime: int, _size: int) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers' GGUF errors are varied: one line
        raise _fail(path, e) from None


class GgufReader:
    """A merge `Reader` over a GGUF file; tensors are dequantised only when asked for.

    Args:
        path: the `.gguf` file.
    """

    def __init__(self, path: str | Path):
        from gguf import GGUFReader
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.path = Path(path)
        try:
            self._file = GGUFReader(str(self.path))
            arch = read_field(self._file, "general.architecture")[0]
        except Exception as e:
            raise _fail(self.path, e) from None
        config = gguf_config(self.path)
        self.config = config
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        try:
            with torch.device("meta"):  # parameter names only: no memory
                skeleton = AutoModelForCausalLM.from_config(config)
            names = _name_map(arch, skeleton, self._processor)
            if any(t.name not in names for t in self._file.tensors):  # transformers' full walk
                names = get_gguf_hf_weights_map(skeleton, self._processor)
        except Exception as e:
            raise _fail(self.path, e) from None
        self._names = names
        self._tensors = {names[t.name]: t for t in self._file.tensors if t.name in names}
        if not self._tensors:
            raise MergeError(f"{self.path}: no tensor of this GGUF file maps to a model weight")
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # the tensor table lists dimensions innermost first, as ggml does
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32  # every tensor is dequantised to float32

    def get(self, name: str) -> Tensor:
        from gguf import dequantize

        t = self._tensors[name]
        weights = dequantize(t.data, t.tensor_type)
        done = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._names,
                                       parsed_parameters={"tensors": {}})  # fmt: skip
        weights = done.weights
        if weights is None:  # experts that transformers gathers across tensors (MoE)
            raise MergeError(f"{self.path}: {name} is split across GGUF tensors; lfm cannot "
                             "merge this architecture from GGUF")  # fmt: skip
        # a float32 tensor comes back as a read-only view of the mapped file: copy it
        out = torch.from_numpy(np.array(weights, dtype=np.float32, order="C", copy=True))
        want = self.shape(name)
        return out.reshape(want) if tuple(out.shape) != want else out


def _name_map(arch: str, model: Any, processor: Any) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, from gguf's table of standard names for
    the architecture (one pass over the model's own parameter names; `get_gguf_hf_weights_map`
    also walks every submodule, which costs seconds, and is used where this leaves a tensor)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    code = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if code is None:
        return {}
    table = get_tensor_name_map(code, model.config.num_hidden_layers)
    out: dict[str, str] = {}
    for hf in model.state_dict():
        stem, dot, suffix = processor.preprocess_name(hf).rpartition(".")
        if suffix not in ("weight", "bias"):
            stem, dot, suffix = processor.preprocess_name(hf), "", ""
        found = table.get_name(stem)
        if found is not None:
            out[found + dot + suffix] = hf
    return out


def write_side_files(path: Path, folder: Path) -> None:
    """The config and tokenizer transformers reads from a GGUF file, saved into `folder`."""
    from transformers import AutoTokenizer

    config = copy.deepcopy(gguf_config(path))
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise _fail(path, e) from None
    if hasattr(config, "quantization_config"):  # the merged weights are plain float32
        del config.quantization_config
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
