"""The layering of the package, measured from the imports (`tools/layers.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("layers", ROOT / "tools" / "layers.py")
layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layers)


def test_the_package_keeps_its_layers():
    problems, uses = layers.check()
    assert problems == []
    assert uses["core"] <= {"errors", "config"}
    for area in layers.AREAS:
        assert uses[area] <= set(layers.FOUNDATION), area


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "lfm" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_core_module_importing_upwards_is_found(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "", "errors.py": "", "registry.py": "",
        "core/__init__.py": "", "core/io.py": "def f():\n    from lfm.registry import get\n",
    })  # fmt: skip
    problems, _ = layers.check(root)
    assert len(problems) == 1 and "lfm.core.io imports lfm.registry" in problems[0]


def test_areas_importing_each_other_and_cycles_are_found(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "", "edit/__init__.py": "", "reuse/__init__.py": "",
        "edit/a.py": "from lfm.reuse import b\nfrom . import c\n",
        "reuse/b.py": "", "edit/c.py": "from lfm.edit.a import x\n",
    })  # fmt: skip
    problems, _ = layers.check(root)
    assert any("lfm.edit.a imports lfm.reuse.b" in p for p in problems)
    assert any(p.startswith("import cycle: lfm.edit.a -> lfm.edit.c") for p in problems)
