"""`lfm reuse`: merge models with the streaming engine, compute statistics for data-aware
merges (Fisher, RegMean), and align two models by weight matching (Git Re-Basin)."""

from __future__ import annotations

from pathlib import Path

import typer

from lfm.errors import LfmError

app = typer.Typer(
    help="Model reuse: merge fine-tuned models (linear, TIES, DARE, SLERP, Model Stock, Fisher, "
    "RegMean, AdaMerging), compute merge statistics, align models for mode connectivity."
)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1) from None


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
        _fail(e)
    typer.echo(f"{plan.method}: merged {len(plan.models)} models into {path}")


@app.command()
def stats(
    kind: str = typer.Argument(..., help="fisher or gram"),
    model: str = typer.Argument(..., help="a causal LM: asset name, folder or file"),
    texts: Path = typer.Argument(..., help="a text file, one example per line"),
    out: Path = typer.Option(..., "--out", "-o", help="the statistics file (.safetensors)"),
    n: int = typer.Option(64, "--n", help="use at most this many lines"),
    fisher_kind: str = typer.Option("sample", help="fisher: sample, label or exact"),
    seed: int = typer.Option(0, help="seeds sampled outputs (fisher)"),
) -> None:
    """Compute a model's diagonal Fisher (next-token) or its linear layers' input Gram matrices."""
    from lfm.assets import load_model
    from lfm.reuse.stats import save_fisher, save_gram

    if kind not in ("fisher", "gram"):
        _fail(LfmError(f"unknown statistics {kind!r}; choose fisher or gram"))
    try:
        handle = load_model(model, kind="causal-lm")
        lines = [t for t in texts.read_text().splitlines() if t.strip()][:n]
        tok = handle.tokenizer  # one text per batch: no padding enters the statistics
        batches = [tok(t, return_tensors="pt")["input_ids"] for t in lines]
        if kind == "fisher":
            save_fisher(out, handle.model, batches, kind=fisher_kind, seed=seed)
        else:
            save_gram(out, handle.model, batches)
    except (LfmError, OSError, ValueError) as e:
        _fail(e)
    typer.echo(f"{kind}: {len(lines)} texts -> {out}")


@app.command()
def rebasin(
    a: Path = typer.Argument(..., help="model A (.safetensors), the reference"),
    b: Path = typer.Argument(..., help="model B (.safetensors), to be permuted"),
    out: Path = typer.Option(..., "--out", "-o", help="B aligned to A (.safetensors)"),
    max_iter: int = typer.Option(100, help="sweeps over the layers at most"),
    seed: int = typer.Option(0, help="seeds the order of the layers"),
) -> None:
    """Permute B's hidden units to match A (weight matching) for a chain of Linear/Conv layers."""
    from safetensors.torch import load_file, save_file

    from lfm.core.io import atomic_path
    from lfm.reuse.rebasin import RebasinConfig, chain_spec_from_state_dict
    from lfm.reuse.rebasin import rebasin as align

    try:
        sa, sb = load_file(str(a)), load_file(str(b))
        spec = chain_spec_from_state_dict(sa)
        aligned, perms = align(sa, sb, spec, RebasinConfig(max_iter=max_iter, seed=seed))
        with atomic_path(out) as tmp:
            save_file({k: v.contiguous() for k, v in aligned.items()}, str(tmp))
    except (LfmError, OSError, KeyError, RuntimeError) as e:
        _fail(e)
    moved = sum(int((p != p.new_tensor(range(len(p)))).sum()) for p in perms.values())
    typer.echo(f"rebasin: {len(perms)} layers aligned, {moved} units moved -> {out}")
