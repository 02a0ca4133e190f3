"""Several tensors merged at once (`driver.in_order`, `merges_at_once`): the same bits, in order."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_reuse_engine import _disk_sd, zoo  # noqa: F401  (the fixture)

from lfm.reuse import driver as D
from lfm.reuse import merge_models, merge_state_dicts
from lfm.reuse.engine import SafetensorsReader
from lfm.reuse.lora import LoraReader


def test_in_order_runs_calls_at_once_and_keeps_the_order():
    together = threading.Barrier(2, timeout=20)  # serial calls would never meet here

    def fn(x: int) -> int:
        if x < 2:
            together.wait()
        time.sleep(0.01 * ((7 * x) % 3))  # finish out of order
        return x * x

    assert list(D.in_order(fn, range(9), workers=2)) == [x * x for x in range(9)]


def test_in_order_raises_at_the_failing_item_and_starts_no_more():
    started: list[int] = []

    def fn(x: int) -> int:
        started.append(x)
        if x == 3:
            raise ValueError("bad tensor 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad tensor 3"):
        for y in D.in_order(fn, range(20), workers=2):
            got.append(y)
    assert got == [0, 1, 2]
    assert max(started) <= 3 + 2  # at most `workers` calls ran ahead of the failing one


def test_in_order_with_one_worker_is_a_plain_map_on_this_thread():
    seen = []
    out = list(D.in_order(lambda x: seen.append(threading.get_ident()) or x, range(4), workers=1))
    assert out == [0, 1, 2, 3] and set(seen) == {threading.get_ident()}


def _sds(zoo: dict[str, Path]) -> tuple[dict, list[dict]]:  # noqa: F811
    return _disk_sd(zoo["base"]), [_disk_sd(zoo[m]) for m in "abc"]


@pytest.mark.parametrize(
    ("method", "cfg"),
    [
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "trim_scope": "model"}),
        ("dare_ties", {"drop_rate": 0.5, "seed": 1}),
        ("della", {"seed": 2}),
        ("linear", {}),
    ],
)
def test_tensors_merged_at_once_are_the_same_bits(zoo, method, cfg):  # noqa: F811
    base, sds = _sds(zoo)
    needs_base = method != "linear"
    runs = []
    for workers in (1, 2, 3):
        inputs = D.plan(D.DictReader(base) if needs_base else None, [D.DictReader(s) for s in sds])
        got: dict[str, torch.Tensor] = {}
        D.run_merge(method, inputs, cfg, got.__setitem__, workers=workers)
        assert list(got) == inputs.names  # the sink sees the template's order
        runs.append(got)
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for k, v in runs[0].items():
            assert torch.equal(other[k], v), k


def test_a_streamed_merge_uses_two_workers_and_equals_the_in_memory_merge(
    zoo,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    seen: list[int] = []
    real = D.in_order

    def spy(fn, items, workers):
        seen.append(workers)
        return real(fn, items, workers)

    monkeypatch.setattr(D, "in_order", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = {"density": 0.3}
        out = merge_models(
            "ties", [zoo[m] for m in "abc"], tmp_path / "out", base=zoo["base"], cfg=cfg,
            max_shard_size="40KB", progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]
    base, sds = _sds(zoo)
    expected = merge_state_dicts("ties", base, sds, cfg)
    written = _disk_sd(out)
    assert written.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(written[k], v), k


class _Stateful:
    """A reader that says nothing about threads (like GGUF's): merged one tensor at a time."""

    def __init__(self, sd):
        self.inner = D.DictReader(sd)
        self.tied = False

    def keys(self):
        return self.inner.keys()

    def shape(self, name):
        return self.inner.shape(name)

    def dtype(self, name):
        return self.inner.dtype(name)

    def get(self, name):
        return self.inner.get(name)


def test_how_many_tensors_at_once(zoo, monkeypatch):  # noqa: F811
    base, sds = _sds(zoo)
    spec = D.kernel_spec("ties")
    on_disk = D.plan(SafetensorsReader(zoo["base"]), [SafetensorsReader(zoo[m]) for m in "ab"])
    in_memory = D.plan(D.DictReader(base), [D.DictReader(s) for s in sds])
    stateful = D.plan(D.DictReader(base), [D.DictReader(sds[0]), _Stateful(sds[1])])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert D.merges_at_once(on_disk, spec, None) == D.MERGE_WORKERS == 2
    assert D.merges_at_once(in_memory, spec, torch.device("cpu")) == 2
    assert D.merges_at_once(stateful, spec, None) == 1
    assert D.merges_at_once(on_disk, spec, torch.device("cuda")) == 1  # an accelerator: one
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert D.merges_at_once(on_disk, spec, None) == 1  # one thread asked for: one
    assert LoraReader.concurrent.fget(type("R", (), {"base": on_disk.base})()) is True  # type: ignore[attr-defined]
    assert LoraReader.concurrent.fget(type("R", (), {"base": _Stateful(base)})()) is False  # type: ignore[attr-defined]


def test_the_command_freezes_the_collector_before_it_exits(tmp_path):
    probe = (
        "import gc, sys\n"
        "from lfm.cli import run\n"
        "sys.argv = ['lfm', 'methods']\n"
        "try:\n    run()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('frozen', gc.get_freeze_count(), 'code', code)\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    frozen = int(p.stdout.split("frozen")[1].split()[0])
    assert frozen > 1000 and p.stdout.strip().endswith("code 0")


def test_a_failing_sink_stops_the_workers_before_the_error_reaches_the_caller(zoo):  # noqa: F811
    base, sds = _sds(zoo)
    inputs = D.plan(D.DictReader(base), [D.DictReader(s) for s in sds])
    calls = []

    def sink(name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full") as caught:
        D.run_merge("ties", inputs, {"density": 0.3}, sink, workers=2)
    # the traceback (kept in `caught`) holds run_merge's frame: the workers stopped before it
    assert caught.traceback and calls == inputs.names[:3]
    assert not [t for t in threading.enumerate() if t.name.startswith("lfm-merge")]
