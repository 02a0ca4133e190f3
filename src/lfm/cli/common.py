"""What every command group shares: one-line errors with exit status 2, and the group itself.

app = group("Model editing: ...")

@app.command("apply")
def apply_(...):   # an LfmError raised inside prints `error: <one line>` and exits 2
    ...
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from lfm.errors import LfmError

err = Console(stderr=True)


def fail(message: object) -> None:
    """Print `error: <message>` as one line on stderr and exit with status 2; an error that
    carries several `problems` (a merge plan's, all found at once) prints one line for each."""
    for line in getattr(message, "problems", None) or [message]:
        err.print(
            f"[red]error:[/red] {' '.join(str(line).split())}", highlight=False, soft_wrap=True
        )
    raise typer.Exit(2)


def finite(value: float | None) -> float | None:
    """Option callback: refuse nan and ±inf, which a `min=`/`max=` range lets through (a usage
    error, exit status 2)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; an `LfmError` becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LfmError as e:
            fail(e)

    return wrapper


class Group(typer.Typer):
    """A command group whose commands all print user errors as one line with exit status 2.

    `@app.command(..., placed=True)` gives a command that loads a model the options `--device`
    and `--dtype` (`with_placement`); `placed="train"`, a command that trains one."""

    def command(  # type: ignore[override]
        self, *args: Any, placed: bool | str = False, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], Any]:
        register = super().command(*args, **kwargs)

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(one_line_errors(with_placement(fn, placed == "train") if placed else fn))
            return fn

        return deco


DEVICE_HELP = (
    "cpu, cuda, cuda:N, mps, or auto (CUDA when present); unset: models load on the CPU and "
    "training uses an accelerator when present"
)
DTYPE_HELP = (
    "the weights' precision: float32, bfloat16, float16 or auto (bfloat16 on a GPU that has it); "
    "training keeps float32 weights and autocasts to it; statistics and solves stay float32/64 "
    "[default: float32]"
)
Device = Annotated[str | None, typer.Option(help=DEVICE_HELP, show_default=False)]
Dtype = Annotated[str | None, typer.Option(help=DTYPE_HELP, show_default=False)]


def with_placement(fn: Callable[..., Any], training: bool = False) -> Callable[..., Any]:
    """`fn` with the options `--device` and `--dtype` added: what is given sets the placement
    (`lfm.core.placement.placed`, for the command's duration) that `load_model` and the training
    loops follow and the run manifests record; a device this machine lacks is one line.
    `training`: the dtype is the loops' autocast and models load in float32."""
    sig = inspect.signature(fn, eval_str=True)  # a given signature is not evaluated again
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
        for n, d, a in (("device", None, Device), ("dtype", None, Dtype))
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, device: str | None = None, dtype: str | None = None, **kw: Any) -> Any:
        from lfm.core import placement

        with placement.placed(device, dtype, training):  # restored after: tests run many
            return fn(*args, **kw)

    params = list(sig.parameters.values())
    wrapper.__signature__ = sig.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def group(help: str) -> Group:
    """A command group (`lfm <area> ...`)."""
    return Group(help=help, no_args_is_help=True, pretty_exceptions_enable=False)


Threads = Annotated[int, typer.Option(min=1, help="torch CPU threads")]


def use_threads(n: int) -> None:
    """Run torch on `n` CPU threads (the `--threads` option)."""
    import torch

    torch.set_num_threads(n)


def mallopt(settings: dict[int, int]) -> bool:
    """Set glibc malloc parameters (`<malloc.h>`'s M_* codes -> values) for the whole process;
    whether every one took (False off glibc). For the commands, not the library."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(opt, value) == 1 for opt, value in settings.items())


def stage(message: str) -> None:
    """One progress line on stderr (`[lfm] message`) for a stage of a long command."""
    err.print(f"[dim]\\[lfm][/dim] {message}", highlight=False, soft_wrap=True)
