"""`lfm reuse`: merge models with the streaming engine."""

from __future__ import annotations

from pathlib import Path

import typer

from lfm.errors import LfmError

app = typer.Typer(
    help="Model reuse: merge fine-tuned models (linear, TIES, DARE, SLERP, Model Stock)."
)


@app.command()
def merge(
    config: Path = typer.Argument(..., help="merge plan YAML (lfm format or a mergekit file)"),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge the models a YAML plan names and write a loadable Hugging Face folder."""
    from lfm.reuse.plan import load_plan

    try:
        plan = load_plan(config)
        path = plan.run(out, overwrite=overwrite, progress=not quiet)
    except LfmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{plan.method}: merged {len(plan.models)} models into {path}")
