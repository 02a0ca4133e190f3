"""Progress of long editing work, reported only where a caller asks for it.

The methods and recipes say what they are doing (`say("loading the model")`, one line per edit)
and wrap their long loops in `bar(...)`; nothing is printed unless the caller runs them inside
`reporting(fn)`, which sends each line to `fn` and turns the bars on (tqdm, on stderr). The CLI
passes `lfm.cli.common.stage`; from Python:

    with progress.reporting(print):
        recipes.apply("smollm2-135m", "rome", reqs, "eiffel.safetensors")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

from lfm.edit.requests import Request

_say: ContextVar[Callable[[str], None] | None] = ContextVar("lfm_edit_say", default=None)
# (i, n) while a sequence runs one request per call: that call's single edit is edit i of n
_step: ContextVar[tuple[int, int] | None] = ContextVar("lfm_edit_step", default=None)


@contextmanager
def reporting(fn: Callable[[str], None]) -> Iterator[None]:
    """Send progress lines to `fn` and show progress bars for the duration of the block."""
    token = _say.set(fn)
    try:
        yield
    finally:
        _say.reset(token)


def active() -> bool:
    """Whether a caller asked for progress (`reporting`)."""
    return _say.get() is not None


def say(message: str) -> None:
    """One progress line, if a caller asked for them."""
    fn = _say.get()
    if fn is not None:
        fn(message)


def bar(iterable: Iterable[Any] | None = None, **kw: Any) -> tqdm:
    """A tqdm bar on stderr, shown while progress is reported (`reporting`), silent otherwise."""
    return tqdm(iterable, disable=not active(), leave=False, dynamic_ncols=True, **kw)


@contextmanager
def step(i: int, n: int) -> Iterator[None]:
    """Inside: a method's single edit is reported as edit i of n (a sequence made call by call)."""
    token = _step.set((i, n))
    try:
        yield
    finally:
        _step.reset(token)


def each(requests: Sequence[Request]) -> Iterator[Request]:
    """The requests, saying `edit i/n: subject -> target` before each one is computed."""
    outer = _step.get()
    for i, r in enumerate(requests, 1):
        k, n = outer if outer is not None and len(requests) == 1 else (i, len(requests))
        say(f"edit {k}/{n}: {r.subject} -> {r.target}")
        yield r


def together(requests: Sequence[Request], how: str) -> None:
    """Say that the requests are computed in one go (`how`); one request is said as by `each`."""
    if len(requests) == 1:
        next(each(requests))
    else:
        say(f"edits 1-{len(requests)}/{len(requests)} {how}")
