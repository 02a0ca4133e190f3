"""`lfm edit`: compute, apply, revert and evaluate edit patches; trace where a fact is recalled.

Each command parses its options, calls `lfm.edit.recipes` inside `progress.reporting(stage)` (so
the recipes' stage lines and bars reach stderr) and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm.cli.common import Threads, finite, group, mallopt, stage, use_threads
from lfm.errors import LfmError

app = group(
    "Model editing: ROME, MEMIT, AlphaEdit, FT-L, GRACE, UltraEdit, WISE, MEND and IKE patches "
    "and their evaluation."
)
Root = typer.Option(Path("runs"), "--root", help="where run directories are created")
Model = Annotated[str, typer.Option("--model", help="model asset name (`lfm models`) or folder")]
Config = Annotated[
    Path | None,
    typer.Option("--config", exists=True, dir_okay=False, help="method config (YAML or JSON)"),
]


def _reporting() -> Any:
    """The recipes' progress (stage lines, tqdm bars) shown on stderr for one command."""
    from lfm.edit import progress

    return progress.reporting(stage)


@app.command("apply", placed=True)
def apply_(
    model: Model = "smollm2-135m",
    method: str = typer.Option(
        "rome",
        "--method",
        "-m",
        help="rome, memit, alphaedit, ultraedit, ft_l, grace, wise, mend or ike",
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
    config: Config = None,
    editor: Path = typer.Option(
        None,
        "--editor",
        file_okay=False,
        help="with -m mend: the trained editor's folder (`lfm edit train-mend`)",
    ),
    on: list[Path] = typer.Option(
        None,
        "--on",
        exists=True,
        help="earlier patches, applied in order before this edit (repeatable); "
        "with -m grace, an earlier codebook to grow",
    ),
    state: Path = typer.Option(
        None,
        "--state",
        help="lifelong state of alphaedit, ultraedit or wise: read if it exists, then updated",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="patch file (.safetensors; JSON for ike's memory patch)"
    ),
    offload: Path = typer.Option(
        None,
        "--offload",
        file_okay=False,
        help="rome, memit, alphaedit: keep only the edited blocks in memory, the others on disk "
        "(read as they run), for models larger than memory; weights not stored as safetensors "
        "are copied to this folder",
    ),
    root: Path = Root,
    threads: Threads = 2,
) -> None:
    """Compute an edit patch for the model (which is not changed), with a run directory."""
    from lfm.edit import recipes

    use_threads(threads)
    if offload is not None:
        _return_freed_memory()
    reqs = () if facts else requests_file or recipes.requests_from(prompt, subject, target)
    cfg: Any = config
    if editor is not None:
        cfg = _with_editor(method, config, editor)
    with _reporting():
        done = recipes.apply(
            model, method, reqs, out, config=cfg, on=on or [], state=state, root=root,
            facts=facts, sequential=sequential, offload=offload,
        )  # fmt: skip
    typer.echo(f"{done.method}: {done.edits} edit(s) on {done.where} -> {done.path}")
    typer.echo(f"run: {done.run}")


def _with_editor(method: str, config: Path | None, editor: Path) -> Any:
    """MEND's config (the file given, else the defaults) with `editor` set to the folder."""
    from lfm import registry
    from lfm.edit.mend import MendConfig

    name = registry.get(method, area="edit").name
    if name != "mend":
        raise LfmError(f"--editor is MEND's trained editor; {name} takes none (use -m mend)")
    base = MendConfig.load(config) if config is not None else MendConfig()
    return base.replace(editor=str(editor))


@app.command("train-mend", placed="train")
def train_mend(
    model: Model = "smollm2-135m",
    facts: str = typer.Option(
        "lifelong", "--facts",
        help="lifelong (its train split), facts, or a JSON-lines facts file with paraphrases "
        "and neighbourhood prompts",
    ),
    steps: int = typer.Option(1000, "--steps", min=1, help="meta-training steps"),
    config: Config = None,
    out: Path = typer.Option(..., "--out", "-o", help="folder for the trained editor"),
    root: Path = Root,
    threads: Threads = 2,
) -> None:  # fmt: skip
    """Meta-train a MEND editor on a fact set, for `lfm edit apply -m mend --editor DIR`."""
    from lfm.edit import recipes

    use_threads(threads)
    with _reporting():
        done = recipes.train_mend(model, facts, out, steps=steps, config=config, root=root)
    first, last = done.first, done.last
    typer.echo(
        f"mend: {done.steps} steps on {done.facts} facts; edit NLL {first['edit']:.3f} -> "
        f"{last['edit']:.3f}, locality KL {first['loc']:.4f} -> {last['loc']:.4f} -> {done.path}"
    )
    typer.echo(f"run: {done.run}")


def _return_freed_memory() -> None:
    """With --offload the blocks read from disk come and go: glibc maps every allocation over
    64 KiB (M_MMAP_THRESHOLD) and unmaps it when freed, instead of keeping it in its heap, where
    the weights of each block and the inputs autograd keeps at each block's boundary fragment it
    (with 1 MiB, a 120-block model's peak grew by 335 MiB in one pass of 16 prompts, 52 MiB with
    64 KiB)."""
    mallopt({-3: 64 << 10})


def _handle(url: str | None, model: str, key: str | None) -> Any:
    """A served model (`lfm serve`) at the level its card gives, SCORES at most, when `url` is
    given, else the model's name. Through a TEXT server the facts are scored by its answers."""
    if not url:
        return model
    from lfm.access import Access
    from lfm.serve import RemoteModel

    # IKE puts ~1,000 tokens of demonstrations before every prompt: small requests, more time
    remote = RemoteModel(url, api_key=key, access="text", chunk=4, timeout=600.0)
    given = Access.parse(str(remote.info().get("lfm_access", "text")))
    remote.access = min(given, Access.SCORES)
    return remote


@app.command("eval", placed=True)
def eval_(
    patch_file: Path = typer.Argument(None, exists=True, help="patch made for this model"),
    model: Model = "smollm2-135m",
    patch_opt: Path = typer.Option(None, "--patch", exists=True, help="the patch, as an option"),
    facts: Path = typer.Option(
        None, "--facts", dir_okay=False,
        help="JSON lines: prompt, subject, target; optional true, paraphrases, neighbourhood",
    ),
    method: str = typer.Option(
        None, "--method", "-m",
        help="ike: evaluate in-context editing on --facts, no patch (before and with IKE)",
    ),
    config: Config = None,
    prompt: list[str] = typer.Option(
        None, "--prompt", help="prompts to complete (default: the patch's)"
    ),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1),
    url: str = typer.Option(
        None, "--url",
        help="a served model (`lfm serve`) instead of --model: at SCORES the facts are scored "
        "by probabilities, at TEXT by its greedy answers",
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LFM_API_KEY", help="API key of the served model"
    ),
    offload: Path = typer.Option(
        None, "--offload", file_okay=False,
        help="keep only the blocks the patch changes in memory, the others on disk (read as "
        "they run), as `apply --offload`",
    ),
    threads: Threads = 2,
) -> None:  # fmt: skip
    """Greedy completions before and after applying a patch, and P(target) per request; with
    --facts, the edit metrics (efficacy, paraphrase, neighbourhood, score) before and after;
    with --method ike --facts, the same metrics before and with IKE's context."""
    from lfm.edit import recipes

    use_threads(threads)
    if patch_file and patch_opt and patch_file != patch_opt:
        raise LfmError("give the patch once: as an argument or with --patch")
    patch_file = patch_file or patch_opt
    if offload is not None:
        if url is not None or method is not None or patch_file is None:
            raise LfmError("--offload evaluates a patch on a local model: give a PATCH, no --url "
                           "and no --method")  # fmt: skip
        _return_freed_memory()
        with _reporting():
            handle: Any = recipes.offloaded(model, offload, [patch_file])
    else:
        handle = _handle(url, model, api_key)
    if method is not None:
        _eval_method(method, handle, facts, patch_file, config)
        return
    if config is not None:
        raise LfmError("--config is IKE's config here: give it with --method ike")
    if facts is not None:
        with _reporting():
            _fact_scores(recipes.evaluate_facts(handle, facts, patch_file))
        return
    if patch_file is None:
        raise LfmError("give a PATCH to evaluate, or --facts FILE")
    with _reporting():
        report = recipes.evaluate(handle, patch_file, prompt or [], max_new_tokens)
    for row in report.completions:
        typer.echo(json.dumps(row, ensure_ascii=False))
    for r, lp in report.logprobs:
        typer.echo(f"log P({r.target!r} | {r.prompt!r}) after the edit = {lp:.3f}")


def _eval_method(
    method: str, handle: Any, facts: Path | None, patch: Path | None, config: Path | None
) -> None:
    """`eval --method ike`: the facts' metrics without context and with IKE (no patch)."""
    from lfm import registry
    from lfm.edit import recipes

    name = registry.get(method, area="edit").name
    if name != "ike":
        raise LfmError(
            f"eval --method takes ike (it edits in context); {name} makes a patch: "
            f"`lfm edit apply -m {name}`, then `lfm edit eval PATCH`"
        )
    if patch is not None or facts is None:
        raise LfmError("--method ike evaluates in context: give --facts FILE and no patch")
    with _reporting():
        _fact_scores(recipes.evaluate_ike(handle, facts, config), after="with IKE")


def _fact_scores(scores, after: str = "after") -> None:
    """One line per state: the metrics in percent (`nan` where the facts give no prompts)."""
    typer.echo(f"{len(scores.facts)} fact(s)")
    names = ("efficacy", "paraphrase", "neighbourhood", "score")
    for state, m in (("before", scores.before), (after, scores.after)):
        if m is not None:
            typer.echo(f"{state:<8} " + "  ".join(f"{k} {m[k]:.1f}" for k in names))


@app.command("patch-apply", placed=True)
def patch_apply(
    patch_file: Path = typer.Argument(..., exists=True, help="weight patch made for this model"),
    model: Model = "smollm2-135m",
    out: Path = typer.Option(..., "--out", "-o", help="folder for the edited model"),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="never load the model: read and write its safetensors one tensor at a time (a "
        "model larger than memory); the same weights",
    ),
    root: Path = Root,
    threads: Threads = 2,
) -> None:
    """Write the model with the patch applied as a Hugging Face folder (+ the originals, for
    revert).

    The model loads on `--device` in `--dtype`; the patch must have been made from the weights in
    that dtype. ΔW is formed on that device and added in that dtype; the folder and the originals
    are written in it. With --stream no model is loaded: each tensor is read from the model's
    safetensors files, cast to `--dtype`, changed on the CPU where the patch edits it and
    written, so memory holds a few tensors."""
    from lfm.edit import recipes

    use_threads(threads)
    with _reporting():
        recipes.patch_apply(model, patch_file, out, root=root, stream=stream)
    typer.echo(f"applied {patch_file} to {model} -> {out}")


@app.command("patch-revert")
def patch_revert(
    folder: Path = typer.Argument(..., help="a folder written by `lfm edit patch-apply`"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the restored model"),
    root: Path = Root,
) -> None:
    """Restore the original weights of an edited model folder, bit for bit.

    No `--device` or `--dtype`: nothing is computed (the weights are read, the originals copied
    over them, the folder written), and the folder loads in its originals' dtype, as
    `patch-apply --dtype` wrote it, since any other would round the weights restored."""
    from lfm.edit import recipes

    recipes.patch_revert(folder, out, root=root)
    typer.echo(f"restored the original weights -> {out}")


@app.command("trace", placed=True)
def trace(
    model: Model = "smollm2-135m",
    prompt: str = typer.Option(..., "--prompt", help="prompt ending where the answer comes"),
    subject: str = typer.Option(..., "--subject", help="the subject, as it occurs in the prompt"),
    answer: str = typer.Option(None, "--answer", help="traced answer (default: top prediction)"),
    samples: int = typer.Option(10, "--samples", min=1, help="noise samples averaged (paper: 10)"),
    noise: float = typer.Option(
        3.0, "--noise", min=0.0, callback=finite, help="noise std in embedding stds (paper: 3)"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the noise"),
    out: Path = typer.Option(..., "--out", "-o", help="heat map PNG; the numbers go to .json"),
    root: Path = Root,
    threads: Threads = 2,
) -> None:
    """Causal tracing (ROME §2): the layer × token effect of restoring clean hidden states."""
    from lfm.edit import recipes

    use_threads(threads)
    with _reporting():
        done = recipes.trace(
            model, prompt, subject, out, answer=answer, samples=samples, noise=noise, seed=seed,
            root=root,
        )  # fmt: skip
    t, (value, layer, i) = done.trace, done.peak
    typer.echo(
        f"p({t.answer!r}): clean {t.clean:.3f}, corrupted {t.corrupted:.3f}; "
        f"peak {value:.3f} at layer {layer}, token {t.tokens[i]!r} -> {done.png}, {done.json}"
    )
    typer.echo(f"run: {done.run}")
