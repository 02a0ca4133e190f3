"""The catalogue: the command groups, methods, models and data sets, as data.

`lfm --help`, `lfm methods`, `lfm models` and `lfm datasets` read it from `catalogue.json`
beside this file, so they answer without importing torch, transformers or any method module.
The file is written from the live registry and asset tables:

    python tools/make_catalogue.py          # rewrite catalogue.json
    python tools/make_catalogue.py --check  # exit 1 if it differs from the live registry

and a test checks that it equals them, so a method registered without rewriting it fails CI.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from lfm.errors import LfmError
from lfm.levels import Access

FILE = Path(__file__).with_name("catalogue.json")
MERGE_HELP = "Merge models from a merge plan (same as `lfm reuse merge`)."


def build() -> dict[str, Any]:
    """The catalogue as the live registry, asset tables and command groups give it (imports all)."""
    from lfm.assets.datasets import DATASETS
    from lfm.assets.models import MODELS
    from lfm.registry import AREAS, methods
    from lfm.serve.cli import serve

    groups = {"runs": "", **dict.fromkeys(AREAS, "")}
    for name in groups:
        groups[name] = importlib.import_module(f"lfm.cli.{name}").app.info.help
    return {
        "areas": list(AREAS),
        "groups": groups,
        "commands": {"serve": inspect.getdoc(serve) or "", "merge": MERGE_HELP},
        "methods": [_method(s) for s in methods()],
        "models": [
            {"name": m.name, "kind": m.kind, "description": m.description, "package": m.package}
            for m in MODELS.values()
        ],
        "datasets": [
            {"name": d.name, "kind": d.kind, "source": d.source, "description": d.description}
            for d in DATASETS.values()
        ],
    }


def _method(s: Any) -> dict[str, Any]:
    """A method as the catalogue lists it; the shape and the extras `lfm plan` reads (`rows`,
    `models`) too, so that `lfm plan` places the methods without importing them."""
    out = {"area": s.area, "name": s.name, "branch": s.branch, "access": s.access.name,
           "paper": s.paper, "command": s.cli, "shape": s.shape.name}  # fmt: skip
    for key in ("rows", "models"):
        if s.extras.get(key) is not None:
            value = s.extras[key]
            out[key] = list(value) if isinstance(value, tuple | list) else value
    return out


@functools.cache
def read() -> dict[str, Any]:
    """The catalogue as written in `catalogue.json`."""
    return json.loads(FILE.read_text())


def methods(area: str | None = None, access: str | None = None) -> list[dict[str, str]]:
    """The catalogue's methods, optionally of one area and usable with a given access level
    (as `lfm.registry.methods` filters the live registry)."""
    cat = read()
    if area is not None and area not in cat["areas"]:
        raise LfmError(f"unknown area {area!r}; areas are {', '.join(cat['areas'])}")
    level = Access.parse(access) if access is not None else None
    return [
        m
        for m in cat["methods"]
        if (area is None or m["area"] == area) and (level is None or Access[m["access"]] <= level)
    ]
