"""`lfm runs`: the run directories, their manifests and their ancestry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lfm.cli.common import group

app = group("Run directories: list them, show one with the runs it came from.")
out = Console()
Root = Annotated[Path, typer.Option(help="where run directories are")]


@app.command("list")
def list_(root: Root = Path("runs")) -> None:
    """Every run under ROOT, oldest first."""
    from lfm.core.runs import list_runs

    runs = list_runs(root)
    table = Table("id", "name", "status", "created", "parents", title=f"{len(runs)} runs in {root}")
    for m in runs:
        table.add_row(m["id"], m.get("name", ""), str(m.get("status", "")), m.get("created", ""),
                      ", ".join(m.get("parents", [])))  # fmt: skip
    out.print(table)


@app.command("show")
def show(
    run_id: Annotated[str, typer.Argument(help="a run id (its folder name) or folder")],
    root: Root = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="print the manifests as JSON")] = False,
) -> None:
    """A run's manifest (config, inputs and their hashes, metrics, status) and its ancestry."""
    from lfm.core.runs import ancestry

    chain = ancestry(run_id, root)
    if as_json:
        out.print_json(json.dumps([m for _, m in chain], default=str))
        return
    for depth, m in chain:
        pad = "  " * depth + ("└ " if depth else "")
        out.print(f"{pad}[bold]{m['id']}[/bold] {m.get('name', '')}: {m.get('status', '')}",
                  highlight=False)  # fmt: skip
        if depth == 0:
            for key in ("created", "finished", "config", "metrics"):
                if m.get(key):
                    out.print(f"  {key}: {json.dumps(m[key], default=str)}", highlight=False)
        for name, info in (m.get("inputs") or {}).items():
            out.print(f"{'  ' * (depth + 1)}input {name}: {info.get('path')} "
                      f"sha256 {str(info.get('sha256'))[:12]}", highlight=False)  # fmt: skip
