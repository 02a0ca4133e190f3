"""Forward hooks by module name: read activations, stop a pass early, write at a position.

Every area that looks inside a model goes through these few context managers, so hooks are
always removed (also when the pass raises) and unknown module names are one clear error:

    with capture(model, ["model.layers.3.mlp"]) as acts:   # outputs (detached by default)
        model(ids)
    with capture(model, ["fc1"], inputs=True) as acts:        # first positional inputs
        model(x)
    with stop_after(model, ["model.layers.3.mlp.down_proj"]) as run:
        run(lambda: model(ids))                               # the blocks above 3 never run
    with add_at(module, rows, positions, delta):              # out[rows, pos] += delta
        model(ids)
    with replay_below(model, "model.layers.22", lambda: model(ids)):
        model(ids)                                            # blocks 0-21 replayed, not run
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

import torch
from torch import nn

from lfm.errors import AccessError

Hook = Callable[[nn.Module, tuple, Any], Any]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by `stop_after`'s runner)."""


def modules_by_name(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The named submodules of `model`; one `AccessError` (a module the handle does not have) listing every unknown name."""
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table]
    if missing:
        raise AccessError(f"no module named {', '.join(missing)} in {type(model).__name__}")
    return {n: table[n] for n in names}


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def hooked(
    hooks: Mapping[nn.Module, Hook] | Sequence[tuple[nn.Module, Hook]], pre: bool = False
) -> Iterator[None]:
    """Register forward hooks (`pre`: pre-hooks `fn(module, args)`) for the block; always removed."""
    pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(
                mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn)
            )
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(
    model: nn.Module, modules: Sequence[str], detach: bool = True, inputs: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record what named modules produce during forward passes (the last pass wins).

    Args:
        model: the module to watch (it is not changed; the hooks are removed on exit).
        modules: names as in `model.named_modules()`.
        detach: drop the autograd graph (keep it to train through the features).
        inputs: record each module's first positional input instead of its output.
    """
    table = modules_by_name(model, modules)
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str, t: Any) -> None:
        acts[name] = t.detach() if detach else t

    def output(name: str) -> Hook:
        return lambda _m, _args, out: keep(name, _first(out))

    def first_input(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            given = [*args, *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]
            if not given:
                raise AccessError(f"module {name} was called without a tensor input")
            keep(name, given[0])  # blocks of transformers take their hidden states by keyword

        return fn

    if not inputs:
        with hooked([(table[m], output(m)) for m in modules]):
            yield acts
        return
    handles = [
        table[m].register_forward_pre_hook(first_input(m), with_kwargs=True) for m in modules
    ]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextmanager
def stop_after(
    model: nn.Module, modules: Sequence[str] | Sequence[nn.Module]
) -> Iterator[Callable[[Callable[[], Any]], bool]]:
    """A runner that ends a forward pass once every listed module has run.

    Yields `run(fn) -> bool`: calls `fn()` (a forward pass), returns True when the pass was cut
    short (the listed modules all ran and the layers above them were skipped).
    """
    mods: list[nn.Module] = (
        list(modules_by_name(model, modules).values())  # type: ignore[arg-type]
        if _names(modules)
        else list(modules)  # type: ignore[arg-type]
    )
    seen: set[int] = set()

    def hook(i: int) -> Hook:
        def fn(_m: nn.Module, _args: tuple, _out: Any) -> None:
            seen.add(i)
            if len(seen) == len(mods):
                raise StopForward

        return fn

    def run(fn: Callable[[], Any]) -> bool:
        seen.clear()
        with suppress(StopForward):
            fn()
            return False
        return True

    with hooked([(m, hook(i)) for i, m in enumerate(mods)]):
        yield run


def _names(modules: Sequence[Any]) -> bool:
    return all(isinstance(m, str) for m in modules)


def _write_at(
    module: nn.Module, rows: torch.Tensor, positions: torch.Tensor,
    new: Callable[[torch.Tensor], torch.Tensor],
) -> AbstractContextManager[None]:  # fmt: skip
    """A forward hook that sets the output at (rows, positions) to `new(current values)`."""

    def fn(_m: nn.Module, _args: tuple, out: Any) -> Any:
        h = _first(out).clone()
        h[rows, positions] = new(h[rows, positions]).to(h.device, h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return hooked([(module, fn)])


def add_at(
    module: nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor
) -> AbstractContextManager[None]:
    """Add `delta` (D,) or (len(rows), D) to the module's output at (rows, positions)."""
    return _write_at(module, rows, positions, lambda h: h + delta.to(h.device, h.dtype))


def replace_at(
    module: nn.Module, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor
) -> AbstractContextManager[None]:
    """Overwrite the module's output at (rows, positions) with `values` (len(rows), D)."""
    return _write_at(module, rows, positions, lambda h: values)


@contextmanager
def frozen(model: nn.Module, train: bool | None = None) -> Iterator[nn.Module]:
    """`model` with gradients off for every parameter, restored on exit.

    Args:
        model: the module; its `requires_grad` flags and train/eval mode come back as they were.
        train: the mode inside the block (None keeps the current one). A student stays in train
            mode while a generator ascends through it (DFAD, DFME), so that its BatchNorm layers
            see batch statistics as in its own updates; a teacher is frozen in eval mode.
    """
    flags, mode = [p.requires_grad for p in model.parameters()], model.training
    if train is not None:
        model.train(train)
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(mode)


class _Replay(nn.Module):
    """Stands in for a block: returns what the block returned on a recorded pass (its tensors
    cloned, so that nothing downstream can write into the record), whatever it is given."""

    def __init__(self, out: Any):
        super().__init__()
        self.out = out

    def forward(self, *_args: Any, **_kw: Any) -> Any:
        return _each_tensor(self.out, torch.Tensor.clone)


def _each_tensor(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` on a block's output: a tensor, or each tensor of a tuple (other items kept)."""
    if isinstance(out, tuple):
        return tuple(fn(t) if isinstance(t, torch.Tensor) else t for t in out)
    return fn(out) if isinstance(out, torch.Tensor) else out


@contextmanager
def replay_below(model: nn.Module, block: str, forward: Callable[[], Any]) -> Iterator[None]:
    """Run the blocks below `block` once, then, inside, replay their outputs instead of running
    them: forward passes on the same inputs as `forward` cost only the blocks from `block` up.

    `block` is a block's name whose parent is the model's list of blocks (`model.layers.22`).
    `forward()` is called once without gradients (stopped after `block`) to record what each
    block below it returns; inside, each of them is replaced by a module that returns that, and
    the originals are put back on exit. Valid only while the inputs and the weights below
    `block` stay as they were — an edit trained at `block` or above, on one fixed prompt batch.
    """
    parent, _, index = block.rpartition(".")
    blocks = model.get_submodule(parent)
    if not (isinstance(blocks, nn.ModuleList) and index.isdigit()):
        raise AccessError(f"{block} is not one of a list of blocks in {type(model).__name__}")
    below = list(range(int(index)))
    outs: dict[int, Any] = {}

    def keep(i: int) -> Hook:
        return lambda _m, _args, out: outs.__setitem__(i, _each_tensor(out, torch.Tensor.detach))

    with (
        torch.no_grad(),
        hooked([(blocks[i], keep(i)) for i in below]),
        stop_after(model, [blocks[int(index)]]) as run,
    ):
        run(forward)
    saved = {i: blocks[i] for i in below}
    try:
        for i in below:
            blocks[i] = _Replay(outs[i])
        yield
    finally:
        for i, original in saved.items():
            blocks[i] = original
