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
linear, slerp, task_arithmetic, ties, dare_ties, dare_linear and model_stock; see docs/reuse.md for
what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lfm.reuse.driver import MergeError, OnMissing

MERGEKIT_METHODS = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "model_stock",
)
# mergekit parameters with no effect on the result here (memory tricks, defaults we share).
MERGEKIT_IGNORED = {"int8_mask", "rescale", "normalize_weights"}


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
    ):
        self.method, self.models, self.base = method, models, base
        self.weights = weights or [1.0] * len(models)
        self.parameters = parameters or {}
        self.max_shard_size, self.on_missing = max_shard_size, on_missing

    def run(self, out: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
        """Merge with the streaming engine into `out`."""
        from lfm.reuse.engine import merge_models

        return merge_models(
            self.method, self.models, out, base=self.base, cfg=self.parameters,
            weights=self.weights, max_shard_size=self.max_shard_size,
            on_missing=self.on_missing, overwrite=overwrite, progress=progress,
        )  # fmt: skip


def load_plan(path: str | Path) -> MergePlan:
    """Read a plan from YAML in lfm's format or mergekit's."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MergeError(f"cannot read merge plan {path}: {e}") from None
    if not isinstance(data, dict):
        raise MergeError(f"merge plan {path} must be a mapping")
    base_dir = Path(path).parent
    plan = from_mergekit(data) if "merge_method" in data else from_lfm(data)
    plan.models = [_resolve(base_dir, m) for m in plan.models]
    plan.base = _resolve(base_dir, plan.base) if plan.base else None
    return plan


def _resolve(root: Path, p: str) -> str:
    """Relative local paths are read from the plan's folder."""
    q = Path(p)
    return str(q if q.is_absolute() or not (root / q).exists() else root / q)


def from_lfm(data: dict[str, Any]) -> MergePlan:
    """A plan in lfm's format."""
    known = {"method", "base", "models", "parameters", "max_shard_size", "on_missing"}
    unknown = sorted(set(data) - known)
    if unknown or "method" not in data or not data.get("models"):
        raise MergeError(
            f"a merge plan needs method and models (unknown keys: {unknown or 'none'})"
        )
    entries = [m if isinstance(m, dict) else {"path": m} for m in data["models"]]
    return MergePlan(
        method=str(data["method"]), base=data.get("base"),
        models=[str(m["path"]) for m in entries],
        weights=[float(m.get("weight", 1.0)) for m in entries],
        parameters=dict(data.get("parameters") or {}),
        max_shard_size=data.get("max_shard_size", "2GB"), on_missing=data.get("on_missing", "error"),
    )  # fmt: skip


def from_mergekit(data: dict[str, Any]) -> MergePlan:
    """Translate a mergekit YAML file (the `models:` form, scalar parameters)."""
    method = str(data["merge_method"])
    if method not in MERGEKIT_METHODS:
        raise MergeError(
            f"mergekit method {method!r} is not supported; use one of {', '.join(MERGEKIT_METHODS)}"
        )
    for key in ("slices", "tokenizer_source", "tokenizer"):
        if key in data:
            raise MergeError(
                f"mergekit key {key!r} is not supported; list whole models under models:"
            )
    entries = [m if isinstance(m, dict) else {"model": m} for m in data.get("models") or []]
    base = data.get("base_model")
    if method == "slerp":
        entries = [{"model": base}] + [m for m in entries if m["model"] != base]
        base = None
    if method not in ("linear", "slerp") and base is not None:
        entries = [m for m in entries if m["model"] != base]  # mergekit may list the base too
    params = {**_shared_model_params(entries), **(data.get("parameters") or {})}
    weights = [float((m.get("parameters") or {}).get("weight", 1.0)) for m in entries]
    return MergePlan(
        method=method, base=base, models=[str(m["model"]) for m in entries], weights=weights,
        parameters=_translate(method, params),
    )  # fmt: skip


def _shared_model_params(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-model parameters other than weight, which must agree across models here."""
    seen: dict[str, set[Any]] = {}
    for m in entries:
        for k, v in (m.get("parameters") or {}).items():
            if k != "weight":
                seen.setdefault(k, set()).add(v)
    varied = [k for k, vs in seen.items() if len(vs) > 1]
    if varied:
        raise MergeError(
            f"per-model {', '.join(varied)} differ between models; lfm takes one value per merge"
        )
    return {k: next(iter(vs)) for k, vs in seen.items()}


def _translate(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """mergekit parameter names and defaults -> lfm config fields."""
    p = {k: v for k, v in params.items() if k not in MERGEKIT_IGNORED and k != "weight"}
    if isinstance(p.get("t"), list):
        raise MergeError("slerp with a list of t values (a gradient over layers) is not supported")
    if "lambda" in p:
        p["scale"] = p.pop("lambda")
    if method in ("ties", "dare_ties", "dare_linear"):
        density = float(p.pop("density", 1.0))  # mergekit's default keeps every entry
        p.update({"density": density} if method == "ties" else {"drop_rate": 1.0 - density})
    if method in ("task_arithmetic", "dare_linear"):
        p.pop("normalize", None)
    if method == "model_stock" and p.pop("filter_wise", False):
        raise MergeError("model_stock with filter_wise: true is not supported")
    return p
