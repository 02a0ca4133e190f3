"""The `lfm` command: a thin layer over the public Python API.

Each area may add a sub-command group by defining `app` in `lfm/cli/<area>.py`; it is mounted as
`lfm <area> ...`. A command parses its options, calls a documented library function (a recipe of
its area, `lfm.<area>.recipes`) and prints. Every error a user can cause exits with status 2 and
one line: an `LfmError` the library raised, or a usage error (a bad option, type or value). Any
other exception is a bug: one line too, exit status 1, the traceback with `LFM_DEBUG=1`.

Area groups are mounted on demand: `lfm reuse merge ...` imports only `lfm.cli.reuse`, so a
command does not pay for the imports of the other areas (the serving stack, PEFT ...). `lfm
--help` lists the groups from the catalogue (`lfm.cli.catalogue`) without importing them, and
`lfm methods`, `models` and `datasets` read it too: they start without torch. `lfm.cli.app` is the
full tree.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import Abort, Exit, TyperException

from lfm.cli import catalogue
from lfm.cli.common import finite, with_placement
from lfm.errors import LfmError

_app = typer.Typer(
    help="lfm: learning from models (tuning, distillation, reuse, meta learning, editing).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"lfm {version('lfm')}", highlight=False)
        raise typer.Exit()


@_app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """lfm: learning from models (tuning, distillation, reuse, meta learning, editing)."""


@_app.command()
def models() -> None:
    """List the offline models lfm knows by name."""
    import importlib.util

    table = Table("name", "kind", "description", "package", "installed", title="models")
    for m in catalogue.read()["models"]:
        module = m["package"].split("==")[0].replace("-", "_")
        ok = importlib.util.find_spec(module) is not None
        table.add_row(m["name"], m["kind"], m["description"], m["package"], "yes" if ok else "no")
    out.print(table)


@_app.command()
def datasets() -> None:
    """List the offline data sets lfm knows by name."""
    table = Table("name", "kind", "source", "description", title="datasets")
    for d in catalogue.read()["datasets"]:
        table.add_row(d["name"], d["kind"], d["source"], d["description"])
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
    """Print the catalogue of methods: area, survey branch, access needed, paper, command."""
    specs = catalogue.methods(area=area, access=access)
    table = Table(
        "area", "method", "survey branch", "access", "paper", "command",
        title=f"methods ({len(specs)})",
    )  # fmt: skip
    for s in specs:
        table.add_row(s["area"], s["name"], s["branch"], s["access"], s["paper"], s["command"])
    out.print(table)


@_app.command()
@with_placement
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
    if "dtype" in d:
        table.add_row("device, dtype", f"{d['device']}, {d['dtype']}")
    for k, v in {**d.get("config", {}), **d["layout"]}.items():
        table.add_row(k, str(v))
    table.add_row("top-level modules", ", ".join(d["top_modules"]))
    out.print(table)


@_app.command()
@with_placement
def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    model: Annotated[str, typer.Option(help="asset name, local path or hub name")] = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 24,
    temperature: Annotated[float, typer.Option(min=0.0, callback=finite, help="0 = greedy")] = 0.0,
) -> None:
    """Continue a prompt through a TEXT-level handle of a model."""
    from lfm.access import narrow
    from lfm.assets import load_model

    with err.status(f"Loading {model}..."):
        local = load_model(model, kind="causal-lm")
    _fits_context(local, prompt, max_new_tokens)
    handle = narrow(local, "text")
    with err.status("Generating..."):
        text = handle.generate([prompt], max_new_tokens=max_new_tokens, temperature=temperature)[0]
    out.print(f"[bold]{prompt}[/bold]{text}", highlight=False)


def _fits_context(handle: Any, prompt: str, max_new_tokens: int) -> None:
    """Refuse an empty prompt, or one that with the new tokens runs past the model's context (a
    position table has no row there: an index error mid-generation, or text the model never saw
    the like of)."""
    n = len(handle.tokenizer(prompt)["input_ids"]) if prompt.strip() else 0
    if n == 0:
        raise LfmError("the prompt is empty: give some text to continue")
    config = getattr(handle.model, "config", None)
    sizes = (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "n_ctx"))
    context = next((s for s in sizes if isinstance(s, int)), None)
    if context is not None and n + max_new_tokens > context:
        raise LfmError(
            f"the prompt is {n} tokens and {max_new_tokens} more are asked for, past the "
            f"model's context of {context} tokens: shorten the prompt or --max-new-tokens"
        )


@_app.command()
def cache(
    clear: Annotated[
        bool, typer.Option("--clear", help="delete the entries lfm wrote (nothing else)")
    ] = False,
) -> None:
    """List (or clear) the cache of converted models and statistics (`$LFM_CACHE`)."""
    from lfm.core import cache as store

    root = store.cache_dir()
    if clear:
        removed, kept = store.clear()
        for item in removed:
            _line(f"removed {_rel(item.path, root)} ({_mib(item.size)})")
        for item in kept:
            _line(f"left {_rel(item.path, root)} ({_mib(item.size)}): {item.note}")
        freed = _mib(sum(i.size for i in removed))
        _line(f"cleared {root}: {len(removed)} removed ({freed}), {len(kept)} left")
        return
    items = store.scan()
    for item in items:
        _line(f"{_rel(item.path, root)}  {_mib(item.size)}  " + (
            f"entry, {item.note}" if item.entry else item.note))  # fmt: skip
    entries = sum(i.entry for i in items)
    _line(f"{root}: {entries} entries, {_mib(sum(i.size for i in items))} in all")


def _line(text: str) -> None:
    """One line, as it is (paths are not wrapped or coloured)."""
    out.print(text, highlight=False, soft_wrap=True)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@_app.command()
def plan(
    target: Annotated[str, typer.Argument(help="asset name, model/adapter folder, or URL")],
    task: Annotated[
        str | None,
        typer.Option(help="classify, edit, merge, ensemble, distill or meta: the methods for it"),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="key of a served model", envvar="LFM_API_KEY")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(min=1, help="with --task: facts, steps or models the estimates are for"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    runnable_only: Annotated[
        bool, typer.Option("--runnable-only", help="leave out the methods that cannot run")
    ] = False,
) -> None:
    """What can be learnt from TARGET through the interface it exposes, by area and branch."""
    from lfm.cli import catalogue
    from lfm.pipeline import plan as make_plan
    from lfm.pipeline.plan import listed

    with err.status(f"Probing {target}..."):  # the methods as listed: no method module imported
        p = make_plan(target, task, api_key, size, listed(catalogue.read()["methods"]))
    if as_json:
        out.print_json(json.dumps(p.to_dict()))
        return
    i = p.interface
    facts = ", ".join(f"{k} {v}" for k, v in i.facts.items() if v not in (None, ""))
    out.print(f"[bold]{i.target}[/bold]: {i.kind}, {i.model}, gives {i.access.name}"
              + (f" ({facts})" if facts else ""), highlight=False)  # fmt: skip
    title = f"{len(p.runnable)} of {len(p.entries)} methods can run" + (
        f" for task {task!r}, best measured first" if task else ""
    )
    cols = ["area", "branch", "method", "needs", "runs here", "measured"]
    table = Table(*cols, *(["estimate"] if task else []), title=title)
    for e in p.entries:
        if runnable_only and not e.runnable:
            continue
        row = [e.area, e.branch, e.key.split("/")[1], e.needs.name,
               "yes" if e.runnable else f"no: {e.why}", e.figures.get("summary", "")]  # fmt: skip
        table.add_row(*row, *([_estimate(e.estimate)] if task else []))
    out.print(table)
    if task:
        out.print("Estimates: the benchmark's figures per unit times the size; CPU time and memory "
                  "scaled by parameter count when measured on another model.", highlight=False)  # fmt: skip


def _estimate(est: dict) -> str:
    """`≈ 180 calls, 3.0 CPU-min, 610 MiB for 10 facts (scaled from smollm2-135m)`."""
    if not est:
        return "not measured"
    secs = est["cpu_s"]
    t = (
        f"{secs:.0f} CPU-s"
        if secs < 120
        else f"{secs / 60:.1f} CPU-min"
        if secs < 7200
        else f"{secs / 3600:.1f} CPU-h"
    )
    size = f", {est['from_params'] / 1e6:.2g}M parameters" if est.get("from_params") else ""
    where = (f"scaled from {est['from']}" if est["scaled"]
             else f"as measured on {est['from']}{size}" if est["scale"] is None else "")  # fmt: skip
    return (
        f"≈ {est['calls']:,} calls, {t}, {est['peak_mib']:.0f} MiB for {est['size']} "
        f"{est['unit']}{'s' if est['size'] != 1 else ''}" + (f" ({where})" if where else "")
    )


@_app.command("run")
def run_(
    pipeline: Annotated[
        Path, typer.Argument(help="a pipeline YAML file", exists=True, dir_okay=False)
    ],
    root: Annotated[Path, typer.Option(help="where run directories are created")] = Path("runs"),
    api_key: Annotated[
        str | None, typer.Option(help="key of served models in the pipeline", envvar="LFM_API_KEY")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="validate only; load nothing")] = False,
) -> None:
    """Run a pipeline of steps across areas; finished steps are skipped, lineage recorded."""
    from lfm.pipeline import spec as pipeline_spec
    from lfm.pipeline.runner import run_pipeline, validate

    if check:
        steps = validate(pipeline_spec.load(pipeline), api_key)
        out.print(f"{pipeline}: {len(steps)} steps, valid: {', '.join(s.name for s in steps)}")
        return
    result = run_pipeline(pipeline, root, api_key, log=lambda m: err.print(m, highlight=False))
    table = Table("step", "run directory", "seconds", title=f"pipeline {result.name}")
    for s in result.steps:
        table.add_row(s.name, s.run_id + (" (skipped)" if s.skipped else ""), f"{s.seconds:.1f}")
    out.print(table)
    out.print(result.markdown(), highlight=False, soft_wrap=True)
    out.print(f"written to {result.folder}", highlight=False)


_TOP_LEVEL = ("models", "datasets", "methods", "info", "generate", "cache", "plan", "run")
_mounted: set[str] = set()
_stubs: set[str] = set()


def _mount(name: str) -> None:
    """Mount one area group, or the top-level `merge` / `serve` commands, once (in place of its
    stand-in, if one was mounted)."""
    if name in _mounted:
        return
    _mounted.add(name)
    if name in _stubs:
        _stubs.discard(name)
        _app.registered_groups = [g for g in _app.registered_groups if g.name != name]
        _app.registered_commands = [c for c in _app.registered_commands if c.name != name]
    if name == "serve":
        from lfm.serve.cli import serve

        _app.command("serve")(with_placement(serve))
    elif name == "merge":
        from lfm.cli.reuse import merge

        _app.command("merge", help=catalogue.MERGE_HELP)(merge)
    else:
        try:
            module = importlib.import_module(f"lfm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lfm.cli.{name}":
                raise
            return
        _app.add_typer(module.app, name=name)


def _stand_ins() -> None:
    """Every group and command by name and help only, from the catalogue: enough for `lfm
    --help` and for a mistyped command's suggestion, without importing any of them."""
    cat = catalogue.read()

    def stand_in() -> None:  # never runs: a command named on the line is mounted for real
        raise LfmError("internal: a stand-in command ran")

    for name, help in cat["commands"].items():
        if name not in _mounted | _stubs:
            _stubs.add(name)
            _app.command(name, help=help)(stand_in)
    for name, help in cat["groups"].items():
        if name not in _mounted | _stubs:
            _stubs.add(name)
            _app.add_typer(typer.Typer(help=help), name=name)


def _mount_areas(argv: list[str] | None = None) -> typer.Typer:
    """The command tree `argv` needs: its command's group when it names one, only the top-level
    commands when it names one of those, else every group by name and help (`lfm --help`, a
    typo). With no `argv`, every group for real (`from lfm.cli import app`)."""
    cat = catalogue.read()
    groups = (*cat["commands"], *cat["groups"])
    first = argv[0] if argv else None  # `lfm --help reuse` lists every group
    if argv is None:
        for name in groups:
            _mount(name)
    elif first in groups:
        _mount(first)
    elif first not in _TOP_LEVEL:
        _stand_ins()
    return _app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the full command tree, for `from lfm.cli import app`
        return _mount_areas()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _error(message: str) -> None:
    err.print(
        f"[red]error:[/red] {' '.join(str(message).split())}", highlight=False, soft_wrap=True
    )


def run() -> None:
    """The `lfm` command and `python -m lfm`: `main`, then a quicker exit.

    At exit Python's garbage collector runs over every object still alive, several times: with
    torch imported (hundreds of thousands of objects) that is about 0.3 s of every command. One
    collection here, then `gc.freeze` of what survives, leaves those passes nothing to scan. The
    cyclic garbage of the run is collected (and finalised) by that one collection; atexit
    handlers and finalizers run as before. (`main` itself, which tests call in their process,
    leaves the collector as it is.)
    """
    try:
        main()
    finally:
        gc.collect()
        gc.freeze()


def main() -> None:
    """Entry point: run the CLI; every error a user can cause is one line and exit status 2."""
    # PEFT 0.21 still asks transformers 5 for a renamed attribute when it loads an adapter; the
    # warning is about their code, not the user's, and would print on every adapter load.
    warnings.filterwarnings(
        "ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    try:
        _run_and_exit()
    finally:
        _end_distributed()


def _end_distributed() -> None:
    """Destroy the process group a launched command (`accelerate launch`, `torchrun`) set up,
    before the interpreter exits: left to the exit, gloo's threads can abort a process that has
    finished its work ("terminate called without an active exception"). Imports nothing."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_and_exit() -> None:
    try:
        code = _mount_areas(sys.argv[1:])(standalone_mode=False)
    except LfmError as e:
        for line in getattr(e, "problems", None) or [str(e)]:
            _error(line)
        sys.exit(2)
    except TyperException as e:  # usage errors: bad option, type, value, missing file
        show = getattr(e, "show", None)
        if callable(show):
            show()
        else:
            _error(e.format_message())
        sys.exit(2)
    except Exit as e:
        sys.exit(e.exit_code)
    except (Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as e:
        if os.environ.get("LFM_DEBUG"):
            raise
        _error(
            f"internal error ({type(e).__name__}: {e}); rerun with LFM_DEBUG=1 for the traceback"
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
