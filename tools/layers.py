"""Check lfm's layering from the imports in its source files; exit 1 on any violation.

    python tools/layers.py            # the check, and what each layer imports
    python tools/layers.py --quiet    # the check only

The layers, bottom up: `errors`, `config`; `core`, `levels`; `access`, `registry`, `runs`, `assets`; the
five areas; `serve`, then `pipeline` (plans and pipelines across the areas) and `cli` on top. A module may import its own package and the layers below
it; the areas never import each other. Every import counts, also those inside functions. Import
cycles between files are violations too.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"
AREAS = ("tuning", "distill", "reuse", "meta", "edit")
FOUNDATION = ("core", "levels", "access", "registry", "config", "errors", "runs", "assets")
# What each top-level part of lfm may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "core": {"errors", "config"},
    "levels": {"errors"},
    "access": {"errors", "config", "core", "levels"},
    "registry": {"errors", "config", "core", "levels", "access"},
    "runs": {"errors", "config", "core"},
    "assets": {"errors", "config", "core", "levels", "access", "runs"},
    **{area: set(FOUNDATION) for area in AREAS},
    "pipeline": {*FOUNDATION, *AREAS, "serve"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The lfm modules `path` imports (resolved to files where they are files)."""
    name = module_name(path, root)
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m == "lfm" or m.startswith("lfm.")}


def part(module: str) -> str:
    """The top-level part of lfm a module belongs to (`lfm.edit.rome` -> `edit`)."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "lfm"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: Path = ROOT) -> tuple[list[str], dict[str, set[str]]]:
    """(violations, what each part imports) for the package `lfm` under `root`."""
    files = sorted((root / "lfm").rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    graph = {
        module_name(f, root): imports(f, modules, root) - {module_name(f, root)} for f in files
    }
    problems: list[str] = []
    uses: dict[str, set[str]] = defaultdict(set)
    for mod, deps in graph.items():
        here = part(mod)
        for dep in deps:
            there = part(dep)
            if there == here:
                continue
            uses[here].add(there)
            if here in ALLOWED and there not in ALLOWED[here]:
                problems.append(
                    f"{mod} imports {dep}: {here} may import only {sorted(ALLOWED[here])}"
                )
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems, uses


def main() -> int:
    problems, uses = check()
    if "--quiet" not in sys.argv:
        for name in (*ALLOWED, "serve", "cli"):
            print(
                f"{name:9s} imports {', '.join(sorted(uses.get(name, set()))) or 'nothing of lfm'}"
            )
    for p in problems:
        print(f"layering: {p}", file=sys.stderr)
    print(f"{len(problems)} layering problems" if problems else "layers and imports: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
