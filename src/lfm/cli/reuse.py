"""`lfm reuse`: merge models with the streaming engine, compute statistics for data-aware
merges (Fisher, RegMean), align two models by weight matching (Git Re-Basin), and classify texts
with an ensemble of language models. Each command runs a function of `lfm.reuse.recipes`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lfm.cli.common import Threads, fail, group, mallopt, stage, use_threads
from lfm.errors import LfmError

app = group(
    "Model reuse: merge fine-tuned models (linear, TIES, DARE, SLERP, Model Stock, Breadcrumbs, "
    "DELLA, TSV-Merge, Iso-C/CTS, Fisher, RegMean, AdaMerging), compute merge statistics, align "
    "models for mode connectivity, ensemble language models, upcycle fine-tuned models into a "
    "mixture of experts."
)


ROOT_HELP = "where run directories are created"
MergeDevice = Annotated[
    str | None,
    typer.Option(
        help="where the merge arithmetic runs: cpu, cuda, cuda:N, mps, or auto (CUDA when "
        "present); each tensor is read on the CPU, its inputs moved there, merged, and the result "
        "moved back to be written (regmean stays on the CPU: its solve is CPU code); unset: the "
        "CPU",
        show_default=False,
    ),
]
MergeDtype = Annotated[
    str | None,
    typer.Option(
        help="the dtype the output's floating tensors are written in: float32, bfloat16 or "
        "float16 (config.json says so); integer tensors keep theirs, the arithmetic stays float32 "
        "or wider, and a value that overflows it is an error; unset: a mergekit plan's out_dtype "
        "(or its dtype without one), else the base (or first) model's dtypes",
        show_default=False,
    ),
]
RebasinDevice = Annotated[
    str | None,
    typer.Option(
        help="where the weight matching runs: cpu, cuda, cuda:N, mps, or auto (CUDA when "
        "present); both models are moved there, the similarity products and permuting run "
        "there, the assignments on the CPU; B aligned is written from the CPU; unset: the CPU",
        show_default=False,
    ),
]


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A streamed merge allocates and frees tensors of the same sizes over and over; by default glibc
    returns big blocks to the kernel (`munmap`, heap trimming), so every new tensor page-faults
    afresh (about half of a TIES or DARE merge's CPU time was system time). Blocks up to 32 MiB (glibc's
    largest mmap threshold) now come from the heap, which is not trimmed. The peak RSS is the same.
    Returns whether the settings took (False off glibc). Affects the whole process: the command
    calls it, the library does not.
    """
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return mallopt({m_mmap_threshold: 32 << 20, m_trim_threshold: 2**31 - 1, m_top_pad: 64 << 20})


def _floats(text: str, what: str) -> list[float] | None:
    """Comma-separated numbers, or None for an empty option."""
    try:
        return [float(w) for w in text.split(",")] if text.strip() else None
    except ValueError:
        raise LfmError(f"{what} are numbers separated by commas, not {text!r}") from None


def _member(model: str, api_key: str | None) -> object:
    """A served model's URL becomes a scores-level client (probed when it is first used); any
    other name is loaded by the recipe."""
    if not model.startswith(("http://", "https://")):
        return model
    from lfm.serve import RemoteModel

    return RemoteModel(model, api_key=api_key, access="scores")


@app.command()
def merge(
    config: Path = typer.Argument(..., help="merge plan YAML (lfm format or a mergekit file)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output model folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="merge NaN and infinite values instead of refusing them"
    ),
    check: bool = typer.Option(
        False,
        "--check",
        help="only check the plan (schema, paths, configs, tensor headers); read no weight",
    ),
    device: MergeDevice = None,
    dtype: MergeDtype = None,
) -> None:
    """Merge the models a YAML plan names and write a loadable Hugging Face folder.

    The whole plan is checked before any weight is read; every problem is one `error:` line.
    `--device` runs each tensor's merge arithmetic there (`merge_models`); `--dtype` writes the
    output's floating tensors in that dtype (a mergekit plan's `out_dtype`, or its `dtype` without
    one, does too; the two may not differ), computed as without it and cast once."""
    from lfm.core import placement
    from lfm.reuse.plan import check_plan
    from lfm.reuse.recipes import merge_plan

    with placement.placed(device):  # `merge_plan` computes on a chosen device; the run records it
        if check:
            merge = check_plan(config, dtype)
            base = f", base {merge.base}" if merge.base else ""
            typer.echo(f"{merge.method}: the plan checks out ({len(merge.models)} models{base}); "
                       "no weight was read")  # fmt: skip
            return
        if out is None:
            fail("--out is required (or pass --check to check the plan only)")
        assert out is not None
        keep_freed_memory()
        plan, path, run = merge_plan(
            config, out, overwrite=overwrite, progress=not quiet, root=root,
            allow_nonfinite=allow_nonfinite, dtype=dtype,
        )  # fmt: skip
        _note_cpu_kernel(plan.method)
    typer.echo(f"{plan.method}: merged {len(plan.models)} models into {path}")
    typer.echo(f"run: {run}")


def _note_cpu_kernel(method: str) -> None:
    """A stage line when a device was chosen and the method's kernel ran on the CPU anyway."""
    from lfm.core import placement
    from lfm.reuse.driver import compute_device, kernel_spec

    at = placement.current()
    if at.device_chosen and compute_device(kernel_spec(method), at.device) is None:
        stage(f"{method} merged on the CPU, not on {at.device}: its kernel is CPU code "
              "(a float64 least-squares solve, LAPACK's gelsd)")  # fmt: skip


@app.command(placed=True)
def moe(
    plan: Path = typer.Argument(..., help="upcycling plan, YAML or JSON (mergekit-moe's form)"),
    out: Path = typer.Option(..., "--out", "-o", help="output Mixtral model folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
    threads: Threads = 2,
) -> None:
    """Upcycle fine-tuned Llama models of one base into a Mixtral mixture of experts."""
    from lfm.reuse.recipes import upcycle_plan

    use_threads(threads)
    plan, done, run = upcycle_plan(plan, out, overwrite=overwrite, progress=not quiet, root=root)
    typer.echo(f"moe: {done.experts} experts, {done.experts_per_token} per token, "
               f"{plan.gate_mode} gates -> {done.out}")  # fmt: skip
    typer.echo(f"run: {run}")


@app.command(placed=True)
def stats(
    kind: str = typer.Argument(..., help="fisher or gram"),
    texts: Path = typer.Argument(..., help="a text file, one example per line"),
    model: str = typer.Option(..., "--model", help="a causal LM: asset name, folder or file"),
    out: Path = typer.Option(..., "--out", "-o", help="the statistics file (.safetensors)"),
    n: int = typer.Option(64, "--n", min=1, help="use at most this many lines"),
    fisher_kind: str = typer.Option("sample", help="fisher: sample, label or exact"),
    seed: int = typer.Option(0, help="seeds sampled outputs (fisher)"),
    root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
    threads: Threads = 2,
) -> None:
    """Compute a model's diagonal Fisher (next-token) or its linear layers' input Gram matrices."""
    from lfm.reuse.recipes import statistics

    use_threads(threads)
    done = statistics(
        kind, model, texts, out, n=n, fisher_kind=fisher_kind, seed=seed, root=root, progress=True
    )
    typer.echo(f"{kind}: {done.texts} texts -> {out}")
    typer.echo(f"run: {done.run}")


@app.command()
def rebasin(
    a: Path = typer.Argument(..., help="model A (.safetensors), the reference"),
    b: Path = typer.Argument(..., help="model B (.safetensors), to be permuted"),
    out: Path = typer.Option(..., "--out", "-o", help="B aligned to A (.safetensors)"),
    max_iter: int = typer.Option(100, help="sweeps over the layers at most"),
    seed: int = typer.Option(0, help="seeds the order of the layers"),
    root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
    device: RebasinDevice = None,
) -> None:
    """Permute B's hidden units to match A (weight matching) for a chain of Linear/Conv layers.

    `--device` runs the weight matching there. There is no `--dtype`: B aligned holds B's values
    moved, never recomputed, in B's stored dtypes, and the similarities are computed in float32."""
    from lfm.core import placement
    from lfm.reuse.rebasin import RebasinConfig
    from lfm.reuse.recipes import rebasin_files

    cfg = RebasinConfig.build(max_iter=max_iter, seed=seed)
    with placement.placed(device):  # `rebasin_files` computes on a chosen device
        done = rebasin_files(a, b, out, cfg, root=root)
    typer.echo(f"rebasin: {done.layers} layers aligned, {done.moved} units moved -> {done.out}")
    typer.echo(f"run: {done.run}")


@app.command(placed=True)
def ensemble(
    models: list[str] = typer.Argument(
        ..., help="causal LMs: asset names, folders or files, or served models' URLs (SCORES)"
    ),
    method: str = typer.Option(
        "ensemble_average",
        "--method",
        "-m",
        help="ensemble_average (probabilities) or ensemble_vote (majority of members)",
    ),
    labels: str = typer.Option(
        "", help="label words, comma-separated; each is scored after a space (default: the classes)"
    ),
    texts: Path | None = typer.Option(None, help="a text file, one example per line"),
    data: Path | None = typer.Option(
        None, dir_okay=False, help="your labelled examples: JSON lines, or CSV with a header (.csv)"
    ),
    text_field: str = typer.Option("text", help="the field of --data holding the text"),
    label_field: str = typer.Option("label", help="the field of --data holding the label"),
    dataset: str | None = typer.Option(
        None, help="a text dataset with labels (bbc-news): test split"
    ),
    template: str = typer.Option("{text}\nTopic:", help="prompt; {text} is the example"),
    weights: str = typer.Option("", help="one weight per model, comma-separated (default: equal)"),
    space: str = typer.Option("prob", help="ensemble_average: prob or logprob"),
    n: int = typer.Option(50, min=1, help="use at most this many examples"),
    max_chars: int = typer.Option(400, min=1, help="cut each text to this many characters"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write predictions as JSON"),
    api_key: str | None = typer.Option(
        None, help="API key of the served models", envvar="LFM_API_KEY"
    ),
    threads: Threads = 2,
) -> None:
    """Classify texts with an ensemble of LMs by label-word scores: averaging or a vote."""
    from lfm.reuse.recipes import classify_texts

    use_threads(threads)
    res = classify_texts(
        [_member(m, api_key) for m in models], method=method, labels=labels.split(","), texts=texts, dataset=dataset,
        template=template, weights=_floats(weights, "weights"), space=space, n=n,
        max_chars=max_chars, out=out, progress=True, data=data, text_field=text_field,
        label_field=label_field,
    )  # fmt: skip
    for text, label in zip(res.texts, res.predictions, strict=True):
        typer.echo(f"{label}\t{text[:60]!r}")
    if res.accuracy is not None:
        typer.echo("accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in res.accuracy.items()))
