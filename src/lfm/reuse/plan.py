"""Merge plans read from YAML: lfm's own format, or a mergekit file as is.

lfm format::

    method: ties
    base: path/to/base
    models:
      - path: path/to/a
        weight: 1.0
      - path/to/b            # weight 1.0
    parameters: {density: 0.2}
    max_shard_size: 2GB      # optional
    on_missing: error        # optional: error | skip

A mergekit file (`merge_method`, `base_model`, `models: [{model, parameters}]`) is translated for
linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear and model_stock; see docs/reuse.md for what differs. Its `out_dtype` is the dtype the
output's floating tensors are written in (as the CLI's `--dtype`), and without one its `dtype`, as
mergekit writes its output in that dtype then (lfm computes in float32 or wider either way).

Both are checked against a schema before any weight is read: every key is one the format knows
(a misspelled key is an error naming the closest known one; a key mergekit knows that lfm cannot
honour is an error saying so), every weight is a finite number, every model entry names a model
that exists (a folder with safetensors weights or a PEFT adapter, a `.safetensors` or `.gguf`
file, or mergekit's `base+adapter`). `check_plan` checks the rest before any weight is read
(configs, tensor names, shapes and dtypes from the headers) and reports every problem at once.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lfm.errors import LfmError
from lfm.reuse.driver import MergeError, OnMissing, read_json_object

if TYPE_CHECKING:
    import torch

MERGEKIT_METHODS = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
)
LFM_KEYS = ("method", "base", "models", "parameters", "max_shard_size", "on_missing")
LFM_MODEL_KEYS = ("path", "weight")
# mergekit's MergeConfiguration (and `name`, which mergekit-multi gives each merge).
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "name", "slices",
                 "modules", "tokenizer_source", "tokenizer", "chat_template", "out_dtype")  # fmt: skip
MERGEKIT_UNSUPPORTED = {
    "slices": "list whole models under models:",
    "modules": "list whole models under models:",
    "tokenizer_source": "the output takes the tokenizer of the base (or first) model",
    "tokenizer": "the output takes the tokenizer of the base (or first) model",
    "chat_template": "the output takes the chat template of the base (or first) model",
}
MERGEKIT_MODEL_KEYS = ("model", "parameters")
# Every parameter name some mergekit merge method reads.
MERGEKIT_PARAMETERS = ("weight", "density", "lambda", "normalize", "int8_mask", "rescale", "t",
                       "filter_wise", "epsilon", "gamma", "select_topk", "nuslerp_flatten",
                       "nuslerp_row_wise", "normalize_weights", "eps", "max_iter", "tol", "r",
                       "alpha", "scale")  # fmt: skip
# The ones mergekit's implementation of each method reads (generalised task arithmetic for four).
_GTA = ("weight", "density", "lambda", "normalize", "int8_mask", "rescale")
MERGEKIT_METHOD_PARAMETERS = {
    "linear": ("weight", "normalize"), "slerp": ("t",), "task_arithmetic": _GTA, "ties": _GTA,
    "dare_ties": _GTA, "dare_linear": _GTA, "breadcrumbs": (*_GTA, "gamma"),
    "breadcrumbs_ties": (*_GTA, "gamma"), "della": (*_GTA, "epsilon"),
    "della_linear": (*_GTA, "epsilon"), "model_stock": ("filter_wise",),
}  # fmt: skip
# The parameters mergekit reads per model; the others it reads only from the shared `parameters`.
MERGEKIT_PER_MODEL = ("weight", "density", "epsilon", "gamma")
# mergekit's defaults of `normalize` and `rescale`, per method.
MERGEKIT_NORMALIZE = {"linear": True, "ties": True, "dare_ties": False, "task_arithmetic": False,
                      "dare_linear": False, "breadcrumbs": False, "breadcrumbs_ties": False,
                      "della": True, "della_linear": False}  # fmt: skip
MERGEKIT_RESCALE = {"ties": False, "dare_ties": True, "task_arithmetic": False, "dare_linear": True,
                    "breadcrumbs": False, "breadcrumbs_ties": False, "della": True,
                    "della_linear": True}  # fmt: skip
# The methods whose lfm kernel sums the task vectors (mergekit's `normalize` divides the weights by
# their sum there), and those whose lfm kernel rescales what it keeps (always; the others never).
_SUMMED = ("task_arithmetic", "dare_linear", "breadcrumbs", "della_linear")
_RESCALED = ("dare_ties", "dare_linear", "della", "della_linear")


class PlanError(MergeError):
    """Everything wrong with a merge plan, found before any weight is read: `problems` holds one
    line per problem (the CLI prints each as an `error:` line); the message joins them with " | "
    after their count, on one line as every `LfmError`'s."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_SHOWN] + (
            [f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else []
        )
        head = f"{len(problems)} problems with the merge plan: " if len(problems) > 1 else ""
        super().__init__(head + " | ".join(shown))
        self.problems = shown


MAX_SHOWN = 30  # a plan against the wrong model differs in every tensor: show the first ones


class Problems:
    """The problems found so far, one line each, in order, without repeats.

    `keep(fn, ...)` runs one check and keeps its `LfmError` as a line instead of raising it,
    returning `default`; `strict=True` raises at the first problem instead (the plain readers
    `from_lfm`, `from_mergekit` and `load_plan` use that when given no collector)."""

    def __init__(self, strict: bool = False):
        self.lines: list[str] = []
        self.strict = strict

    def add(self, line: str) -> None:
        if self.strict:
            raise MergeError(line)
        line = " ".join(line.split())
        if line not in self.lines:
            self.lines.append(line)

    def keep(self, fn: Callable[..., Any], *args: Any, default: Any = None, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except LfmError as e:
            if self.strict:
                raise
            self.add(str(e))
            return default


class MergePlan:
    """What to merge, how, and with which knobs.

    Args:
        method: a registered merge method.
        models: model folders or safetensors files.
        base: the base model, if the method needs one.
        weights: one weight per model.
        parameters: the method's config fields.
        max_shard_size: the largest output shard.
        on_missing: "error" or "skip" (see `merge_models`).
        out_dtype: the dtype the output's floating tensors are written in (a mergekit file's
            `out_dtype`); None: the template's.
    """

    def __init__(
        self,
        method: str,
        models: list[str],
        base: str | None = None,
        weights: list[float] | None = None,
        parameters: dict[str, Any] | None = None,
        max_shard_size: int | str = "2GB",
        on_missing: OnMissing = "error",
        out_dtype: torch.dtype | None = None,
    ):
        self.method, self.models, self.base = method, models, base
        self.weights = weights or [1.0] * len(models)
        self.parameters = parameters or {}
        self.max_shard_size, self.on_missing = max_shard_size, on_missing
        self.out_dtype = out_dtype

    def output_dtype(self, dtype: str | torch.dtype | None = None) -> torch.dtype | None:
        """The dtype the merge writes its floating tensors in: `dtype` (the CLI's `--dtype`),
        else the plan's `out_dtype`; None: the template's. Both given and different: a one-line
        `MergeError`, as is a name that is not a dtype (`engine.output_dtype`)."""
        from lfm.reuse.driver import dtype_name
        from lfm.reuse.engine import output_dtype

        given = output_dtype(dtype)
        if given is not None and self.out_dtype is not None and given != self.out_dtype:
            raise MergeError(
                f"--dtype {dtype_name(given)} differs from the plan's out_dtype "
                f"{dtype_name(self.out_dtype)}: give one of them, or the same dtype"
            )
        return given if given is not None else self.out_dtype

    def run(
        self,
        out: str | Path,
        overwrite: bool = False,
        progress: bool = True,
        allow_nonfinite: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Path:
        """Merge with the streaming engine into `out` (see `merge_models` for the options;
        `dtype` over the plan's `out_dtype`: `output_dtype`)."""
        from lfm.reuse.engine import merge_models

        return merge_models(
            self.method, self.models, out, base=self.base, cfg=self.parameters,
            weights=self.weights, max_shard_size=self.max_shard_size,
            on_missing=self.on_missing, overwrite=overwrite, progress=progress,
            allow_nonfinite=allow_nonfinite, device=device, dtype=self.output_dtype(dtype),
        )  # fmt: skip


def load_plan(path: str | Path, found: Problems | None = None) -> MergePlan:
    """Read a plan from YAML in lfm's format or mergekit's, and check every model it names.

    `found`: a collector that keeps every problem (see `check_plan`); without one the first
    problem is raised."""
    found = found or Problems(strict=True)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MergeError(f"cannot read merge plan {path}: {e}") from None
    if not isinstance(data, dict):
        raise MergeError(f"merge plan {path} must be a mapping")
    base_dir = Path(path).parent
    plan = from_mergekit(data, found) if is_mergekit(data) else from_lfm(data, found)
    plan.models = [_resolve(base_dir, m) for m in plan.models]
    plan.base = _resolve(base_dir, plan.base) if plan.base else None
    for i, model in enumerate(plan.models):
        found.keep(check_model_path, model, f"model {i}")
    if plan.base is not None:
        found.keep(check_model_path, plan.base, "the base model")
    return plan


def check_plan(path: str | Path, dtype: str | torch.dtype | None = None) -> MergePlan:
    """Read a plan and check all of it before one weight is read: its schema; the method, its
    parameters and the weights; every model path; every model's `config.json` against the
    template's; and every tensor's name, shape and dtype, read from the safetensors headers.
    `dtype`: an output dtype asked for besides the plan (`--dtype`), checked as a dtype and
    against the plan's `out_dtype` (`MergePlan.output_dtype`). Every problem found is one line of
    the `PlanError` raised, all at once."""
    from lfm.reuse.driver import check_weights, kernel_spec

    found = Problems()
    merge = load_plan(path, found)
    found.keep(merge.output_dtype, dtype)
    spec = found.keep(kernel_spec, merge.method)
    if spec is not None:  # unknown parameter names are reported by the schema check already
        fields = spec.config.model_fields
        config = found.keep(
            spec.resolve, {k: v for k, v in merge.parameters.items() if k in fields}
        )
        if config is not None:
            found.keep(check_weights, spec, config, merge.weights)
        if spec.extras.get("needs_base", True) and merge.base is None:
            found.add(f"{spec.name} needs a base model: give base (mergekit: base_model)")
    if not merge.models:
        if not found.lines:
            found.add("the merge plan names no model")
    else:
        _check_headers(merge, found)
    if found.lines:
        raise PlanError(found.lines)
    return merge


# config.json fields that must agree between the models of one merge
CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "vocab_size")  # fmt: skip


def _check_headers(merge: MergePlan, found: Problems) -> None:
    """Configs, tensor names, shapes and dtypes of every model that can be opened; the tensor
    checks run once every model opens (their messages number the models as the plan does)."""
    from lfm.reuse.driver import plan as map_inputs
    from lfm.reuse.engine import _base_reader, _template_folder, open_model

    readable = Problems()
    entries = [(f"model {i}", m) for i, m in enumerate(merge.models)]
    entries += [("the base model", merge.base)] if merge.base is not None else []
    for what, m in entries:
        readable.keep(check_model_path, m, what)
    if readable.lines:  # load_plan has reported these; nothing more can be read
        return
    template = Path(merge.base) if merge.base is not None else _template_folder(merge.models[0])
    _check_configs(template, [_template_folder(m) for m in merge.models], found)
    base = found.keep(_base_reader, merge.base) if merge.base is not None else None
    readers = [found.keep(open_model, m, merge.base, base) for m in merge.models]
    if any(r is None for r in readers) or (merge.base is not None and base is None):
        return
    lines: list[str] = []
    inputs = found.keep(map_inputs, base, readers, merge.on_missing, lines)
    for line in lines:
        found.add(line)
    if inputs is None:
        return
    tmpl = inputs.template
    for name in inputs.names:
        want = found.keep(tmpl.dtype, name)
        for i, (reader, key) in enumerate(zip(inputs.models, inputs.sources[name], strict=True)):
            got = found.keep(reader.dtype, key) if key is not None else None
            if (
                want is not None
                and got is not None
                and want.is_floating_point > got.is_floating_point
            ):
                found.add(f"model {i} stores {name} as {got}, where the template stores floats "
                          f"({want}): an integer tensor cannot be merged into a floating one")  # fmt: skip


def _config(folder: Path) -> dict[str, Any] | None:
    from lfm.reuse.gguf import gguf_config, is_gguf

    if is_gguf(folder):  # the config transformers reads from the file; a file that cannot be
        try:  # read is reported once, when its reader opens
            return dict(gguf_config(folder).to_dict())
        except MergeError:
            return None
    cfg = folder / "config.json" if folder.is_dir() else folder.with_name("config.json")
    if not cfg.is_file():
        return None
    data = read_json_object(cfg)
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data


def _check_configs(template: Path, models: list[Path], found: Problems) -> None:
    """Each model's `config.json` agrees with the template's on `CONFIG_FIELDS` (where both
    have a config and the field)."""
    want = found.keep(_config, template)
    for i, folder in enumerate(models):
        got = found.keep(_config, folder)
        if want is None or got is None or folder.resolve() == template.resolve():
            continue
        for key in CONFIG_FIELDS:
            if key in want and key in got and want[key] != got[key]:
                found.add(f"model {i} ({folder}): config.json has {key} {got[key]!r}, the "
                          f"template ({template}) {want[key]!r}")  # fmt: skip


def is_mergekit(data: Mapping[str, Any]) -> bool:
    """A mergekit file: it has `merge_method` or `base_model`, or a key one letter or two away
    from `merge_method` (so that a misspelt one is reported against mergekit's keys)."""
    keys = [str(k) for k in data]
    return bool({"merge_method", "base_model"} & set(keys)) or bool(
        difflib.get_close_matches("merge_method", keys, n=1, cutoff=0.8)
    )


def _resolve(root: Path, p: str) -> str:
    """Relative local paths are read from the plan's folder."""
    q = Path(p)
    return str(q if q.is_absolute() or not (root / q).exists() else root / q)


def check_model_path(path: str, what: str) -> None:
    """A one-line `MergeError` unless `path` names a model the engine reads: a folder with
    safetensors weights (or a PEFT adapter), a `.safetensors` or `.gguf` file, or
    `base+adapter`."""
    from lfm.reuse.lora import is_adapter, split_plus

    plus = split_plus(path)
    p = Path(plus[0] if plus is not None else path)
    if not p.exists():
        raise MergeError(
            f"{what}: no such file or folder {p} (relative paths are read from the plan's folder)"
        )
    if p.is_file() and p.suffix.lower() not in (".safetensors", ".gguf"):
        raise MergeError(
            f"{what}: {p} is a file, not a model; give a model folder, a .safetensors or a .gguf "
            "file"
        )
    if p.is_dir() and not (any(p.glob("*.safetensors")) or is_adapter(p)):
        raise MergeError(
            f"{what}: {p} holds no safetensors weights; lfm merges safetensors models "
            "(save the model with save_pretrained(safe_serialization=True))"
        )


# ---------------------------------------------------------------------------------------------
# The schema: keys, numbers, model entries.


def check_keys(where: str, data: Mapping[str, Any], known: Iterable[str]) -> None:
    """A one-line `MergeError` for a key not in `known`, naming the closest known key."""
    known = tuple(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
            raise MergeError(f"unknown key {key!r} in {where}; {hint}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeError(f"{where} must be a mapping of names to values, not {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    """A finite number (YAML's `5e-1` arrives as a string and is read as one)."""
    if isinstance(value, bool):
        raise MergeError(f"{where} must be a number, not {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{where} must be a number, not {value!r}") from None
    if not math.isfinite(x):
        raise MergeError(f"{where} must be a finite number, not {value!r}")
    return x


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str | Path) or not str(value).strip():
        raise MergeError(f"{where} must be a path, not {value!r}")
    return str(value)


def _model_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise MergeError(f"{where} must be a non-empty list of models, not {value!r}")
    return value


def from_lfm(data: dict[str, Any], found: Problems | None = None) -> MergePlan:
    """A plan in lfm's format (`found`: keep every problem instead of raising the first)."""
    found = found or Problems(strict=True)
    found.keep(check_keys, "the merge plan", data, LFM_KEYS)
    if "method" not in data or "models" not in data:
        raise MergeError("a merge plan needs method and models")
    method = data["method"]
    if not isinstance(method, str):
        found.add(f"method must be the name of a merge method, not {method!r}")
    models: list[str] = []
    weights: list[float] = []
    for i, m in enumerate(found.keep(_model_list, data["models"], "models", default=[])):
        entry = m if isinstance(m, dict) else {"path": m}
        found.keep(check_keys, f"model {i} of the merge plan", entry, LFM_MODEL_KEYS)
        if "path" not in entry:
            found.add(f"model {i} of the merge plan has no path")
            continue
        path = found.keep(_path, entry["path"], f"the path of model {i}")
        weight = found.keep(_number, entry.get("weight", 1.0), f"the weight of model {i}",
                            default=1.0)  # fmt: skip
        if path is not None:
            models.append(path)
            weights.append(weight)
    params = found.keep(_mapping, data.get("parameters"), "parameters", default={})
    if isinstance(method, str):
        found.keep(_check_fields, method, params)
    on_missing = data.get("on_missing", "error")
    if on_missing not in ("error", "skip"):
        found.add(f"on_missing must be error or skip, not {on_missing!r}")
        on_missing = "error"
    size = data.get("max_shard_size", "2GB")
    from lfm.reuse.engine import parse_size

    wrong_type = isinstance(size, bool) or not isinstance(size, int | str)
    # an unreadable size is parse_size's own line (and reads as 1 here, not a second line)
    if wrong_type or found.keep(parse_size, size, default=1) <= 0:
        found.add(f"max_shard_size must be a size like 2GB or 500MB, not {size!r}")
        size = "2GB"
    base = None
    if data.get("base") is not None:
        base = found.keep(_path, data["base"], "base")
    return MergePlan(method=str(method), base=base, models=models, weights=weights,
                     parameters=dict(params), max_shard_size=size, on_missing=on_missing)  # fmt: skip


def _check_fields(method: str, params: Mapping[str, Any]) -> None:
    """Parameter names against the method's config fields (the config checks the values)."""
    from lfm.reuse.driver import kernel_spec

    spec = kernel_spec(method)
    check_keys(f"the parameters of {spec.name}", params, spec.config.model_fields)


# ---------------------------------------------------------------------------------------------
# mergekit files.


def from_mergekit(data: dict[str, Any], found: Problems | None = None) -> MergePlan:
    """Translate a mergekit YAML file (the `models:` form, one value per parameter); `found`:
    keep every problem instead of raising the first."""
    found = found or Problems(strict=True)
    found.keep(check_keys, "the mergekit file", data, MERGEKIT_KEYS)
    for key, why in MERGEKIT_UNSUPPORTED.items():
        if data.get(key) is not None:
            found.add(f"mergekit key {key!r} is not supported ({why})")
    out_dtype = None  # the written dtype: `out_dtype`, else `dtype` (as mergekit writes)
    key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
    if data.get(key) is not None:
        out_dtype = found.keep(_out_dtype, data[key], key)
    if "merge_method" not in data:
        raise MergeError("a mergekit file needs merge_method")
    method = data["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise MergeError(
            f"mergekit method {method!r} is not supported; use one of {', '.join(MERGEKIT_METHODS)}"
        )
    listed = found.keep(_model_list, data.get("models"), "models", default=[])
    entries = [e for i, m in enumerate(listed) if (e := found.keep(_mergekit_entry, i, m))]
    base = None
    if data.get("base_model") is not None:
        base = found.keep(_path, data["base_model"], "base_model")
    if method == "slerp":  # base_model is the t = 0 end, whether models lists it or not
        if base is None:
            raise MergeError("mergekit's slerp needs base_model (the t = 0 end)")
        entries = [{"model": base, "parameters": {}}] + [m for m in entries if m["model"] != base]
        base = None
    if method not in ("linear", "slerp") and base is not None:
        entries = [m for m in entries if m["model"] != base]  # mergekit may list the base too
    if not entries:  # nothing to merge: what else the file says cannot be checked against it
        if listed:
            found.add("the mergekit file lists no model besides the base model")
        return MergePlan(
            method=method, base=base, models=[], weights=[], parameters={}, out_dtype=out_dtype
        )
    shared = found.keep(_mapping, data.get("parameters"), "parameters", default={})
    found.keep(_check_mergekit_parameters, method, shared)
    for m in entries:
        found.keep(_check_mergekit_parameters, method, m["parameters"], per_model=True)
    weights = [
        found.keep(
            _number,
            m["parameters"].get("weight", shared.get("weight", 1.0)),
            f"the weight of {m['model']}",
            default=1.0,
        )
        for m in entries
    ]
    params, normalize = found.keep(
        lambda: _translate(method, _agreed(entries, shared)), default=({}, False)
    )
    if normalize:  # Σ w_i τ_i / Σ w_i: the same as weights divided by their sum
        total = math.fsum(weights)
        if abs(total) < 1e-8:
            found.add(
                f"normalize: true divides by the sum of the weights, and {weights} sums to zero"
            )
        else:
            weights = [w / total for w in weights]
    return MergePlan(method=method, base=base, models=[m["model"] for m in entries],
                     weights=weights, parameters=params, out_dtype=out_dtype)  # fmt: skip


def _out_dtype(value: Any, key: str = "out_dtype") -> torch.dtype | None:
    """mergekit's `out_dtype` (or `dtype`, which mergekit writes in when there is no
    `out_dtype`): a dtype name (`engine.output_dtype`)."""
    from lfm.reuse.engine import output_dtype

    if not isinstance(value, str):
        raise MergeError(f"{key} must be float32, bfloat16 or float16, not {value!r}")
    try:
        return output_dtype(value)
    except MergeError as e:
        raise MergeError(f"{key}: {e}") from None


def _mergekit_entry(i: int, m: Any) -> dict[str, Any]:
    """One entry of `models:` as {model, parameters}, checked."""
    entry = m if isinstance(m, dict) else {"model": m}
    check_keys(f"model {i} of the mergekit file", entry, MERGEKIT_MODEL_KEYS)
    if "model" not in entry:
        raise MergeError(f"model {i} of the mergekit file has no model")
    model = entry["model"]
    if isinstance(model, dict):
        raise MergeError(f"model {i}: give the model as a path string (model: path or base+lora)")
    params = _mapping(entry.get("parameters"), f"the parameters of model {i}")
    return {"model": _path(model, f"model {i}"), "parameters": params}


def _check_mergekit_parameters(
    method: str, params: Mapping[str, Any], per_model: bool = False
) -> None:
    """Names mergekit's `method` reads, or lfm's config fields of the method; scalar values.

    Per model, only the names mergekit reads per model (it would ignore the others there).
    """
    from lfm.reuse.driver import kernel_spec

    own = MERGEKIT_METHOD_PARAMETERS[method]
    fields = tuple(kernel_spec(method).config.model_fields)
    for key, value in params.items():
        if per_model and key not in MERGEKIT_PER_MODEL and (key in own or key in fields):
            raise MergeError(
                f"{key!r} is read from the shared parameters, not per model: move it under "
                "the top-level parameters:"
            )
        if key in MERGEKIT_PARAMETERS and key not in own and key not in fields:
            raise MergeError(
                f"mergekit parameter {key!r} is not supported with {method} (mergekit's {method} "
                f"reads {', '.join(own)})"
            )
        if isinstance(value, list | dict):
            raise MergeError(
                f"parameter {key!r}: per-layer gradients and filtered values are not supported; "
                "give one value"
            )
    check_keys(f"the parameters of {method}", params, dict.fromkeys((*own, *fields)))


def _agreed(entries: list[dict[str, Any]], shared: Mapping[str, Any]) -> dict[str, Any]:
    """One value per parameter other than weight: a model's own, else the shared one (mergekit's
    order); lfm takes one value per merge, so the models must agree."""
    names = {k for m in entries for k in m["parameters"]} | set(shared)
    out: dict[str, Any] = {}
    for name in sorted(names - {"weight"}):
        values = [m["parameters"].get(name, shared.get(name, _UNSET)) for m in entries]
        if _UNSET in values:
            raise MergeError(
                f"{name} is set for some models only; set it for every model or under parameters"
            )
        if len({repr(v) for v in values}) > 1:
            raise MergeError(
                f"per-model {name} differ between models; lfm takes one value per merge"
            )
        out[name] = values[0]
    return out


_UNSET = object()


def _lfm_default(method: str, field: str) -> Any:
    from lfm.reuse.driver import kernel_spec

    return kernel_spec(method).config.model_fields[field].default


def _flag(params: dict[str, Any], name: str, default: bool) -> bool:
    value = params.pop(name, default)
    if not isinstance(value, bool):
        raise MergeError(f"{name} must be true or false, not {value!r}")
    return value


def _density(value: Any) -> float:
    density = _number(value, "density")
    if not 0 <= density <= 1:
        raise MergeError(
            f"density is the fraction of each task vector kept, in [0, 1], not {value}"
        )
    return density


def _translate(method: str, params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """mergekit parameter names and defaults -> lfm config fields, and whether to divide the
    weights by their sum (mergekit's `normalize` for the methods whose lfm config has none)."""
    p = dict(params)
    p.pop("int8_mask", None)  # a memory trick; no effect on the result
    if method in MERGEKIT_RESCALE:
        rescale = _flag(p, "rescale", MERGEKIT_RESCALE[method])
        if method != "task_arithmetic" and rescale != (method in _RESCALED):
            # lfm's DARE and DELLA always rescale by 1 / (1 - p); TIES and Breadcrumbs never do
            raise MergeError(f"rescale: {str(rescale).lower()} is not supported with {method}")
    if "lambda" in p:
        if "scale" in p:
            raise MergeError("give lambda or scale, not both")
        p["scale"] = p.pop("lambda")
    normalize = False
    if method in _SUMMED:
        normalize = _flag(p, "normalize", MERGEKIT_NORMALIZE[method])
    elif method in MERGEKIT_NORMALIZE:
        given = _flag(p, "normalize", MERGEKIT_NORMALIZE[method])
        if "normalize" in params or given != _lfm_default(method, "normalize"):
            p["normalize"] = given  # mergekit's default where lfm's differs (dare_ties: False)
    if method == "ties":
        p["density"] = _density(p.pop("density", 1.0))  # mergekit's default keeps all
    if method in ("dare_ties", "dare_linear"):
        if "drop_rate" in p and "density" in p:
            raise MergeError("give density (mergekit's) or drop_rate (lfm's), not both")
        if "drop_rate" not in p:
            p["drop_rate"] = 1.0 - _density(p.pop("density", 1.0))
    if method.startswith("breadcrumbs"):
        _breadcrumbs_band(p)
    if method.startswith("della"):
        _della_probabilities(p)
    if method == "task_arithmetic":
        p.pop("density", None)  # mergekit's task arithmetic does not sparsify
    if method == "model_stock" and _flag(p, "filter_wise", False):
        raise MergeError("model_stock with filter_wise: true is not supported")
    return p, normalize


def _either(p: dict[str, Any], theirs: tuple[str, ...], ours: tuple[str, ...]) -> bool:
    """Whether mergekit's names are used (an error when both vocabularies are)."""
    if any(k in p for k in theirs) and any(k in p for k in ours):
        raise MergeError(
            f"give {' and '.join(theirs)} (mergekit's) or {' and '.join(ours)} (lfm's), not both"
        )
    return not any(k in p for k in ours)


def _breadcrumbs_band(p: dict[str, Any]) -> None:
    """mergekit's keep fraction `density` (1.0: keep all) and top fraction `gamma` (0.01) -> lfm's
    `drop_top` and `drop_bottom`; a gamma above 1 − density is cut to it, as mergekit does."""
    if not _either(p, ("density", "gamma"), ("drop_top", "drop_bottom")):
        return
    density = _density(p.pop("density", 1.0))
    gamma = _number(p.pop("gamma", 0.01), "gamma")
    if not 0 <= gamma <= 1:
        raise MergeError(
            f"gamma is the fraction of largest magnitudes removed, in [0, 1], not {gamma}"
        )
    if density >= 1:  # mergekit returns the task vector as it is
        p["drop_top"], p["drop_bottom"] = 0.0, 0.0
        return
    p["drop_top"] = min(gamma, 1.0 - density)
    p["drop_bottom"] = max(0.0, 1.0 - density - p["drop_top"])


def _della_probabilities(p: dict[str, Any]) -> None:
    """mergekit's keep fraction `density` (1.0: keep all) and half-width `epsilon` (0.15) of the
    keep probabilities -> lfm's `drop_rate = 1 − density` and full width `window = 2 epsilon`."""
    if not _either(p, ("density", "epsilon"), ("drop_rate", "window")):
        return
    density = _density(p.pop("density", 1.0))
    epsilon = _number(p.pop("epsilon", 0.15), "epsilon")
    if density >= 1:  # mergekit returns the task vector as it is
        p["drop_rate"], p["window"] = 0.0, 0.0
        return
    p["drop_rate"], p["window"] = 1.0 - density, 2 * epsilon
