"""The `lfm` command: a thin layer over the public Python API.

Each area may add a sub-command group by defining `app` in `lfm/cli/<area>.py`; it is mounted as
`lfm <area> ...`. Errors that lfm raises on purpose print as one line and exit with status 2.

Area groups are mounted on demand: `lfm reuse merge ...` imports only `lfm.cli.reuse`, so a
command does not pay for the imports of the other areas (the serving stack, PEFT ...); anything
else (`lfm --help`, `lfm methods`) and `lfm.cli.app` see every group.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from lfm.errors import LfmError

_app = typer.Typer(
    help="lfm: learning from models (tuning, distillation, reuse, meta learning, editing).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


@_app.command()
def models() -> None:
    """List the offline models lfm knows by name."""
    import importlib.util

    from lfm.assets.models import MODELS

    table = Table("name", "kind", "description", "package", "installed", title="models")
    for m in MODELS.values():
        module = m.package.split("==")[0].replace("-", "_")
        ok = importlib.util.find_spec(module) is not None
        table.add_row(m.name, m.kind, m.description, m.package, "yes" if ok else "no")
    out.print(table)


@_app.command()
def datasets() -> None:
    """List the offline data sets lfm knows by name."""
    from lfm.assets.datasets import DATASETS

    table = Table("name", "kind", "source", "description", title="datasets")
    for d in DATASETS.values():
        table.add_row(d.name, d.kind, d.source, d.description)
    out.print(table)


@_app.command()
def methods(
    area: Annotated[
        str | None, typer.Option(help="only this area (tuning, distill, reuse, meta, edit)")
    ] = None,
    access: Annotated[
        str | None, typer.Option(help="only methods usable with this access level")
    ] = None,
) -> None:
    """Print the catalogue of methods: area, survey branch, access needed, paper."""
    from lfm.registry import methods as list_methods

    specs = list_methods(area=area, access=access)
    table = Table(
        "area", "method", "survey branch", "access", "paper", title=f"methods ({len(specs)})"
    )
    for s in specs:
        table.add_row(s.area, s.name, s.branch, s.access.name, s.paper)
    out.print(table)


@_app.command()
def info(
    model: Annotated[
        str, typer.Argument(help="asset name, local path or hub name")
    ] = "smollm2-135m",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Architecture, parameters, layer names and access levels of a model."""
    from lfm.assets import describe, load_model

    with err.status(f"Loading {model}..."):
        handle = load_model(model)
    d = describe(handle)
    if as_json:
        out.print_json(json.dumps(d))
        return
    table = Table(show_header=False, title=f"{d['name']} ({d['class']})")
    table.add_row("parameters", f"{d['parameters']:,}")
    table.add_row("access offered", " < ".join(d["access"]))
    for k, v in {**d.get("config", {}), **d["layout"]}.items():
        table.add_row(k, str(v))
    table.add_row("top-level modules", ", ".join(d["top_modules"]))
    out.print(table)


@_app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    model: Annotated[str, typer.Option(help="asset name, local path or hub name")] = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 24,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
) -> None:
    """Continue a prompt through a TEXT-level handle of a model."""
    from lfm.access import narrow
    from lfm.assets import load_model

    with err.status(f"Loading {model}..."):
        handle = narrow(load_model(model, kind="causal-lm"), "text")
    with err.status("Generating..."):
        text = handle.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature)[0]
    out.print(f"[bold]{prompt}[/bold]{text}", highlight=False)


@_app.command()
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="delete every cached file")] = False,
) -> None:
    """Show (or clear) the cache of converted models and statistics (`$LFM_CACHE`)."""
    from lfm.assets.cache import cache_dir

    root = cache_dir()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    if clear:
        shutil.rmtree(root)
        out.print(f"cleared {root} ({size / 2**20:.1f} MiB)")
    else:
        out.print(f"{root}: {size / 2**20:.1f} MiB")


_mounted: set[str] = set()


def _mount(name: str) -> None:
    """Mount one area group, or the top-level `merge` / `serve` commands, once."""
    if name in _mounted:
        return
    _mounted.add(name)
    if name == "serve":
        from lfm.serve.cli import serve

        _app.command("serve")(serve)
    elif name == "merge":
        from lfm.cli.reuse import merge

        _app.command("merge", help="Merge models from a merge plan (same as `lfm reuse merge`).")(
            merge
        )
    else:
        try:
            module = importlib.import_module(f"lfm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lfm.cli.{name}":
                raise
            return
        _app.add_typer(module.app, name=name)


def _mount_areas(argv: list[str] | None = None) -> typer.Typer:
    """Mount what `argv` needs: its command's group when it names one, else every group."""
    from lfm.registry import AREAS

    first = argv[0] if argv else None  # `lfm --help reuse` still lists every group
    if first in ("serve", "merge", *AREAS):
        _mount(first)
    else:
        for name in ("serve", "merge", *AREAS):
            _mount(name)
    return _app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the full command tree, for `from lfm.cli import app`
        return _mount_areas()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point: run the CLI; print deliberate errors as one line."""
    try:
        code = _mount_areas(sys.argv[1:])(standalone_mode=False)
    except LfmError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        err.print("aborted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
