"""`lfm edit`: compute, apply, revert and evaluate edit patches (thin over `lfm.edit`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lfm.errors import LfmError

app = typer.Typer(help="Model editing: ROME, MEMIT, AlphaEdit, FT-L patches and their evaluation.")


def _fail(e: LfmError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2) from None


def _requests(prompt, subject, target, requests_file):
    from lfm.edit.requests import Request, read_requests

    if requests_file is not None:
        return read_requests(requests_file)
    if not (prompt and subject and target):
        raise LfmError("give --prompt, --subject and --target, or --requests FILE.jsonl")
    return [Request(prompt, subject, target)]


@app.command("apply")
def apply_(
    model: str = typer.Argument(..., help="model name (`lfm models`) or path"),
    method: str = typer.Option("rome", "--method", "-m", help="rome, memit, alphaedit or ft-l"),
    prompt: str = typer.Option(None, "--prompt", help="prompt ending where the target comes"),
    subject: str = typer.Option(None, "--subject", help="the subject, as it occurs in the prompt"),
    target: str = typer.Option(None, "--target", help="the new object (no leading space)"),
    requests_file: Path = typer.Option(None, "--requests", help="JSON lines of requests"),
    config: Path = typer.Option(None, "--config", help="method config (YAML or JSON)"),
    on: list[Path] = typer.Option(
        None, "--on", help="earlier patches, applied in order before this edit (repeatable)"
    ),
    state: Path = typer.Option(
        None, "--state", help="sequential AlphaEdit state: read if it exists, then updated"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="patch file (.safetensors)"),
) -> None:
    """Compute an edit patch for MODEL (the model itself is not changed)."""
    from lfm.assets import load_model
    from lfm.registry import get

    try:
        spec = get(f"edit/{method}")
        cfg = spec.config.load(config) if config else spec.config()
        reqs = _requests(prompt, subject, target, requests_file)
        handle = load_model(model)
        _apply_earlier(handle, on or [])
        if state is None:
            patch = spec.fn(handle, reqs, cfg)
            path = patch.save(out)
        else:  # the state advances only once its patch is written
            patch, after = _sequential_step(handle, method, reqs, cfg, state)
            path = patch.save(out)
            after.save(state)
    except LfmError as e:
        _fail(e)
    typer.echo(f"{method}: {len(reqs)} edit(s) on {', '.join(patch.modules)} -> {path}")


def _apply_earlier(handle, patches: list[Path]) -> None:
    from lfm.edit.patch import Patch

    for p in patches:
        Patch.load(p).apply(handle.model)


def _sequential_step(handle, method: str, reqs, cfg, state_file: Path):
    from lfm.edit.sequential import AlphaEditState, alphaedit_step

    if method != "alphaedit":
        raise LfmError(f"--state is for sequential AlphaEdit; {method} keeps no state")
    before = AlphaEditState.load(state_file) if state_file.exists() else None
    return alphaedit_step(handle, reqs, before, cfg)


def _patched(model: str, patch_file: Path):
    from lfm.assets import load_model
    from lfm.edit.patch import Patch

    handle = load_model(model)
    patch = Patch.load(patch_file)
    return handle, patch, patch.apply(handle.model)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="model name or path"),
    patch_file: Path = typer.Argument(..., help="patch made for this model"),
    prompt: list[str] = typer.Option(
        None, "--prompt", help="prompts to complete (default: the patch's)"
    ),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens"),
) -> None:
    """Greedy completions before and after applying a patch, and P(target) per request."""
    try:
        handle, patch, undo = _patched(model, patch_file)
    except LfmError as e:
        _fail(e)
    prompts = prompt or [r.prompt for r in patch.requests]
    after = handle.generate(prompts, max_new_tokens=max_new_tokens)
    hits = [handle.score([r.prompt], [f" {r.target}"]).item() for r in patch.requests]
    undo.revert(handle.model)
    before = handle.generate(prompts, max_new_tokens=max_new_tokens)
    for p, b, a in zip(prompts, before, after, strict=True):
        typer.echo(json.dumps({"prompt": p, "before": b, "after": a}, ensure_ascii=False))
    for r, lp in zip(patch.requests, hits, strict=True):
        typer.echo(f"log P({r.target!r} | {r.prompt!r}) after the edit = {lp:.3f}")


@app.command("patch-apply")
def patch_apply(
    model: str = typer.Argument(..., help="model name or path"),
    patch_file: Path = typer.Argument(..., help="patch made for this model"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the edited model"),
) -> None:
    """Write MODEL with the patch applied as a Hugging Face folder (+ the originals, for revert)."""
    from lfm.edit.patch import save_edited

    try:
        handle, patch, undo = _patched(model, patch_file)
        save_edited(handle, undo, out)
    except LfmError as e:
        _fail(e)
    typer.echo(f"applied {patch.method} patch to {model} -> {out}")


@app.command("patch-revert")
def patch_revert(
    folder: Path = typer.Argument(..., help="a folder written by `lfm edit patch-apply`"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the restored model"),
) -> None:
    """Restore the original weights of an edited model folder, bit for bit."""
    from lfm.edit.patch import revert_folder

    try:
        revert_folder(folder, out)
    except LfmError as e:
        _fail(e)
    typer.echo(f"restored the original weights -> {out}")


@app.command("trace")
def trace(
    model: str = typer.Argument(..., help="model name or path"),
    prompt: str = typer.Option(..., "--prompt", help="prompt ending where the answer comes"),
    subject: str = typer.Option(..., "--subject", help="the subject, as it occurs in the prompt"),
    answer: str = typer.Option(None, "--answer", help="traced answer (default: top prediction)"),
    samples: int = typer.Option(10, "--samples", help="noise samples averaged (paper: 10)"),
    noise: float = typer.Option(3.0, "--noise", help="noise std in embedding stds (paper: 3)"),
    out: Path = typer.Option(..., "--out", "-o", help="heat map PNG; the numbers go to .json"),
) -> None:
    """Causal tracing (ROME §2): the layer × token effect of restoring clean hidden states."""
    from lfm.assets import load_model
    from lfm.edit.trace import causal_trace, plot

    try:
        t = causal_trace(
            load_model(model), prompt, subject, answer=answer, samples=samples, noise=noise
        )
    except LfmError as e:
        _fail(e)
    plot(t, out)
    data = t.save(Path(out).with_suffix(".json"))
    peak = max(
        ((v, layer, i) for layer, row in enumerate(t.effect) for i, v in enumerate(row)),
        key=lambda x: x[0],
    )
    typer.echo(
        f"p({t.answer!r}): clean {t.clean:.3f}, corrupted {t.corrupted:.3f}; "
        f"peak {peak[0]:.3f} at layer {peak[1]}, token {t.tokens[peak[2]]!r} -> {out}, {data}"
    )
