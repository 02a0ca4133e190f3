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


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A streamed merge allocates and frees tensors of the same sizes over and over; by default glibc
    returns big blocks to the kernel (`munmap`, heap trimming), so every new tensor page-faults
    afresh (about half of a TIES or DARE merge's CPU time was system time). Blocks up to 32 MiB (glibc's
    largest mmap threshold) now come from the heap, which is not trimmed. The peak RSS is the same.
    Returns whether the settings took (False off glibc). Affects the whole process: the command
    calls it, the library does not.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(
        libc.mallopt(opt, value) == 1
        for opt, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1),
                           (m_top_pad, 64 << 20))
    )  # fmt: skip


@app.command()
def merge(
    config: Path = typer.Argument(..., help="merge plan YAML (lfm format or a mergekit file)"),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge the models a YAML plan names and write a loadable Hugging Face folder."""
    from lfm.reuse.plan import load_plan

    keep_freed_memory()
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


@app.command()
def ensemble(
    models: list[str] = typer.Argument(..., help="causal LMs: asset names, folders or files"),
    labels: str = typer.Option(
        "", help="label words, comma-separated; each is scored after a space (default: the classes)"
    ),
    texts: Path | None = typer.Option(None, help="a text file, one example per line"),
    dataset: str | None = typer.Option(
        None, help="a text dataset with labels (bbc-news): test split"
    ),
    template: str = typer.Option("{text}\nTopic:", help="prompt; {text} is the example"),
    mode: str = typer.Option(
        "average", help="average (probabilities) or vote (majority of members)"
    ),
    weights: str = typer.Option("", help="one weight per model, comma-separated (default: equal)"),
    space: str = typer.Option("prob", help="average: prob or logprob"),
    n: int = typer.Option(50, help="use at most this many examples"),
    max_chars: int = typer.Option(400, help="cut each text to this many characters"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write predictions as JSON"),
) -> None:
    """Classify texts with an ensemble of LMs by label-word scores: averaging or a vote."""
    import json

    from lfm.assets import load_model
    from lfm.reuse.ensemble import classify_label_words

    if mode not in ("average", "vote") or space not in ("prob", "logprob"):
        _fail(
            LfmError(f"mode is average or vote (got {mode!r}), space prob or logprob ({space!r})")
        )
    try:
        rows, gold, words = _ensemble_inputs(texts, dataset, labels, n)
        ws = [float(w) for w in weights.split(",")] if weights else None
        if ws is not None and len(ws) != len(models):
            raise LfmError(f"{len(ws)} weights for {len(models)} models")
        handles = [load_model(m, kind="causal-lm") for m in models]
        prompts = [template.format(text=t[:max_chars]) for t in rows]
        pred, members = classify_label_words(handles, prompts, words, mode, ws, space)  # type: ignore[arg-type]
    except (LfmError, OSError, ValueError, KeyError) as e:
        _fail(e)
    names = [w.strip() for w in words]
    result = {"labels": names, "predictions": [names[i] for i in pred.tolist()]}
    for i, t in enumerate(rows):
        typer.echo(f"{names[int(pred[i])]}\t{t[:60]!r}")
    if gold is not None:
        acc = {m: float((p == gold).float().mean()) for m, p in zip(models, members, strict=True)}
        acc["ensemble"] = float((pred == gold).float().mean())
        result["accuracy"] = acc
        typer.echo("accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


def _ensemble_inputs(texts: Path | None, dataset: str | None, labels: str, n: int):
    """(texts, gold labels or None, label words) from a text file or a labelled text dataset."""
    from lfm.assets.datasets import load_dataset

    if (texts is None) == (dataset is None):
        raise LfmError("give exactly one of --texts or --dataset")
    words = [f" {w.strip()}" for w in labels.split(",") if w.strip()]
    if texts is not None:
        if not words:
            raise LfmError("--texts needs --labels (the label words)")
        return [t for t in texts.read_text().splitlines() if t.strip()][:n], None, words
    data = load_dataset(dataset)  # type: ignore[arg-type]
    if not hasattr(data, "test_texts"):
        raise LfmError(f"{dataset} is not a labelled text dataset")
    words = words or [f" {c}" for c in data.classes]  # the label word follows "Topic:"
    # every class in turn, so a small n still covers all classes
    order = sorted(range(len(data.test_texts)), key=lambda i: (_rank(data.y_test, i), i))[:n]
    return [data.test_texts[i] for i in order], data.y_test[order], words


def _rank(labels, i: int) -> int:
    """The position of example i among the examples of its class."""
    return int((labels[:i] == labels[i]).sum())
