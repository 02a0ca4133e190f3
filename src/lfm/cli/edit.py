"""`lfm edit`: compute, apply, revert and evaluate edit patches; trace where a fact is recalled.

Each command parses its options, calls `lfm.edit.recipes` and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lfm.cli.common import finite, group
from lfm.errors import LfmError

app = group(
    "Model editing: ROME, MEMIT, AlphaEdit, FT-L, GRACE and IKE patches and their evaluation."
)
Root = typer.Option(Path("runs"), "--root", help="where run directories are created")


@app.command("apply")
def apply_(
    model: str = typer.Argument(..., help="model name (`lfm models`) or path"),
    method: str = typer.Option(
        "rome", "--method", "-m", help="rome, memit, alphaedit, ft_l, grace or ike"
    ),
    prompt: str = typer.Option(None, "--prompt", help="prompt ending where the target comes"),
    subject: str = typer.Option(None, "--subject", help="the subject, as it occurs in the prompt"),
    target: str = typer.Option(None, "--target", help="the new object (no leading space)"),
    requests_file: Path = typer.Option(
        None, "--requests", exists=True, dir_okay=False, help="JSON lines of requests"
    ),
    facts: Path = typer.Option(
        None, "--facts", dir_okay=False, help="JSON lines of facts to edit (see `lfm edit eval`)"
    ),
    sequential: bool = typer.Option(
        False, "--sequential", help="one edit at a time, each on the weights the last left"
    ),
    config: Path = typer.Option(
        None, "--config", exists=True, dir_okay=False, help="method config (YAML or JSON)"
    ),
    on: list[Path] = typer.Option(
        None,
        "--on",
        exists=True,
        help="earlier patches, applied in order before this edit (repeatable)",
    ),
    state: Path = typer.Option(
        None, "--state", help="sequential AlphaEdit state: read if it exists, then updated"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="patch file (.safetensors; JSON for ike's memory patch)"
    ),
    root: Path = Root,
) -> None:
    """Compute an edit patch for MODEL (the model itself is not changed), with a run directory."""
    from lfm.edit import recipes

    reqs = () if facts else requests_file or recipes.requests_from(prompt, subject, target)
    done = recipes.apply(
        model, method, reqs, out, config=config, on=on or [], state=state, root=root,
        facts=facts, sequential=sequential,
    )  # fmt: skip
    typer.echo(f"{done.method}: {done.edits} edit(s) on {done.where} -> {done.path}")
    typer.echo(f"run: {done.run}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="model name or path"),
    patch_file: Path = typer.Argument(None, exists=True, help="patch made for this model"),
    patch_opt: Path = typer.Option(None, "--patch", exists=True, help="the patch, as an option"),
    facts: Path = typer.Option(
        None, "--facts", dir_okay=False,
        help="JSON lines: prompt, subject, target; optional true, paraphrases, neighbourhood",
    ),
    prompt: list[str] = typer.Option(
        None, "--prompt", help="prompts to complete (default: the patch's)"
    ),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1),
) -> None:  # fmt: skip
    """Greedy completions before and after applying a patch, and P(target) per request; with
    --facts, the edit metrics (efficacy, paraphrase, neighbourhood, score) before and after."""
    from lfm.edit import recipes

    if patch_file and patch_opt and patch_file != patch_opt:
        raise LfmError("give the patch once: as an argument or with --patch")
    patch_file = patch_file or patch_opt
    if facts is not None:
        _fact_scores(recipes.evaluate_facts(model, facts, patch_file))
        return
    if patch_file is None:
        raise LfmError("give a PATCH to evaluate, or --facts FILE")
    report = recipes.evaluate(model, patch_file, prompt or [], max_new_tokens)
    for row in report.completions:
        typer.echo(json.dumps(row, ensure_ascii=False))
    for r, lp in report.logprobs:
        typer.echo(f"log P({r.target!r} | {r.prompt!r}) after the edit = {lp:.3f}")


def _fact_scores(scores) -> None:
    """One line per state: the metrics in percent (`nan` where the facts give no prompts)."""
    typer.echo(f"{len(scores.facts)} fact(s)")
    names = ("efficacy", "paraphrase", "neighbourhood", "score")
    for state, m in (("before", scores.before), ("after", scores.after)):
        if m is not None:
            typer.echo(f"{state:<6} " + "  ".join(f"{k} {m[k]:.1f}" for k in names))


@app.command("patch-apply")
def patch_apply(
    model: str = typer.Argument(..., help="model name or path"),
    patch_file: Path = typer.Argument(..., exists=True, help="weight patch made for this model"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the edited model"),
    root: Path = Root,
) -> None:
    """Write MODEL with the patch applied as a Hugging Face folder (+ the originals, for revert)."""
    from lfm.edit import recipes

    recipes.patch_apply(model, patch_file, out, root=root)
    typer.echo(f"applied {patch_file} to {model} -> {out}")


@app.command("patch-revert")
def patch_revert(
    folder: Path = typer.Argument(..., help="a folder written by `lfm edit patch-apply`"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the restored model"),
    root: Path = Root,
) -> None:
    """Restore the original weights of an edited model folder, bit for bit."""
    from lfm.edit import recipes

    recipes.patch_revert(folder, out, root=root)
    typer.echo(f"restored the original weights -> {out}")


@app.command("trace")
def trace(
    model: str = typer.Argument(..., help="model name or path"),
    prompt: str = typer.Option(..., "--prompt", help="prompt ending where the answer comes"),
    subject: str = typer.Option(..., "--subject", help="the subject, as it occurs in the prompt"),
    answer: str = typer.Option(None, "--answer", help="traced answer (default: top prediction)"),
    samples: int = typer.Option(10, "--samples", min=1, help="noise samples averaged (paper: 10)"),
    noise: float = typer.Option(
        3.0, "--noise", min=0.0, callback=finite, help="noise std in embedding stds (paper: 3)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="heat map PNG; the numbers go to .json"),
    root: Path = Root,
) -> None:
    """Causal tracing (ROME §2): the layer × token effect of restoring clean hidden states."""
    from lfm.edit import recipes

    done = recipes.trace(
        model, prompt, subject, out, answer=answer, samples=samples, noise=noise, root=root
    )
    t, (value, layer, i) = done.trace, done.peak
    typer.echo(
        f"p({t.answer!r}): clean {t.clean:.3f}, corrupted {t.corrupted:.3f}; "
        f"peak {value:.3f} at layer {layer}, token {t.tokens[i]!r} -> {done.png}, {done.json}"
    )
    typer.echo(f"run: {done.run}")
