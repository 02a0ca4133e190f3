"""The streaming shard writer: safetensors files written tensor by tensor from a known layout."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm.core import shards as S
from lfm.core.shards import ShardError
from lfm.reuse import engine as E


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=gen),
        "b.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64),
        "d.mask": torch.tensor([True, False, True]),
        "e.scale": torch.tensor(2.5),  # 0-dim
        "f.empty": torch.zeros(0, 3),
        "g.half": torch.randn(2, 2, generator=gen).half(),
    }


def _entries(ts: dict[str, torch.Tensor]) -> list[S.Entry]:
    return [S.Entry(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]


def test_plan_shards_starts_a_new_shard_only_when_the_next_tensor_would_not_fit():
    entries = [S.Entry(f"t{i}", torch.uint8, (n,)) for i, n in enumerate([4, 4, 4, 10, 1])]
    shards = S.plan_shards(entries, 8)
    assert [[e.name for e in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


@pytest.mark.parametrize("max_bytes", [10**9, 100])
def test_written_shards_load_with_safetensors(tmp_path, max_bytes):
    ts = _tensors()
    with S.ShardWriter(tmp_path, _entries(ts), max_bytes) as w:
        for k, v in ts.items():
            w.add(k, v)
        names = w.close()
    loaded = {k: v for n in names for k, v in load_file(tmp_path / n).items()}
    assert loaded.keys() == ts.keys()
    for k, v in ts.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    for n in names:
        with open(tmp_path / n, "rb") as f:
            assert struct.unpack("<Q", f.read(8))[0] % 8 == 0  # aligned data, as safetensors pads
    if len(names) > 1:
        wmap = json.loads((tmp_path / S.INDEX).read_text())["weight_map"]
        assert set(wmap) == set(ts) and set(wmap.values()) == set(names)
    else:
        assert names == ["model.safetensors"] and not (tmp_path / S.INDEX).exists()


def test_each_tensor_is_on_disk_when_flushed(tmp_path):
    ts = {"x": torch.randn(64, 64), "y": torch.randn(64, 64)}
    w = S.ShardWriter(tmp_path, _entries(ts), 10**9)
    w.add("x", ts["x"])
    w.flush()  # the background writer has written x, and nothing is buffered
    header = S.shard_header(_entries(ts))
    assert (tmp_path / "model.safetensors").stat().st_size == len(header) + 64 * 64 * 4
    w.add("y", ts["y"])
    w.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["y"], ts["y"])


def test_at_most_depth_tensors_wait_and_write_errors_surface(tmp_path, monkeypatch):
    ts = {f"t{i}": torch.full((8,), float(i)) for i in range(6)}
    release = threading.Event()
    real_write = S.ShardWriter._open

    def slow_open(self, shard):  # hold the writer thread before its first file
        release.wait(10)
        real_write(self, shard)

    monkeypatch.setattr(S.ShardWriter, "_open", slow_open)
    w = S.ShardWriter(tmp_path, _entries(ts), 10**9, depth=2)
    for name in ("t0", "t1", "t2"):  # t0 is taken by the thread, t1 and t2 wait
        w.add(name, ts[name])
    assert w._queue.full()  # a fourth add would block: memory is bounded
    release.set()
    for name in ("t3", "t4", "t5"):
        w.add(name, ts[name])
    w.close()
    assert all(torch.equal(load_file(tmp_path / "model.safetensors")[k], v) for k, v in ts.items())

    gone = tmp_path / "gone"
    monkeypatch.setattr(S.ShardWriter, "_open", real_write)
    w = S.ShardWriter(gone, _entries(ts), 10**9)  # the folder does not exist: open fails
    w.add("t0", ts["t0"])
    with pytest.raises(ShardError, match=r"writing .*gone"):
        w.close()


def test_writer_refuses_tensors_out_of_layout(tmp_path):
    ts = {"x": torch.zeros(2), "y": torch.zeros(3)}
    want = "expected x torch.float32"
    with S.ShardWriter(tmp_path, _entries(ts), 10**9) as w, pytest.raises(ShardError, match=want):
        w.add("y", ts["y"])
    with S.ShardWriter(tmp_path, _entries(ts), 10**9) as w, pytest.raises(ShardError, match=want):
        w.add("x", torch.zeros(2, dtype=torch.float64))
    with S.ShardWriter(tmp_path, _entries(ts), 10**9) as w:
        w.add("x", ts["x"])
        with pytest.raises(ShardError, match="before every tensor"):
            w.close()


def test_reader_gives_header_dtypes(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "m.safetensors")
    r = E.SafetensorsReader(tmp_path / "m.safetensors")
    assert {k: r.dtype(k) for k in ts} == {k: v.dtype for k, v in ts.items()}
    assert r.shape("e.scale") == () and r.shape("a.weight") == (8, 4)


@pytest.fixture(params=["read", "mapped"])
def way(request, monkeypatch):
    """Both ways `StoredFile.read` takes: a read into memory of its own, or (every tensor over 0
    bytes, as over `MAPPED_OVER` otherwise) a private map of the file; the maps made are
    counted."""
    maps = []
    if request.param == "mapped":
        real = S.StoredFile._mapped

        def spy(self, *a):
            out = real(self, *a)
            if out is not None:
                maps.append(a[0])
            return out

        monkeypatch.setattr(S, "MAPPED_OVER", 0)
        monkeypatch.setattr(S.StoredFile, "_mapped", spy)
    return request.param, maps


def test_stored_file_reads_each_tensor_as_safetensors_does(tmp_path, monkeypatch, way):
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "u8": torch.arange(5).byte(),
    }  # fmt: skip
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    want = load_file(path)
    f = S.StoredFile(path)
    for name, t in want.items():
        got = f.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        got.zero_() if got.dtype != torch.bool else got.fill_(False)  # memory of its own
    assert torch.equal(S.read_tensor(path, "f32"), tensors["f32"])  # the file is unchanged
    fds = len(os.listdir("/proc/self/fd"))
    held = [f.read("f32") for _ in range(20)]  # maps hold no file descriptor
    assert len(os.listdir("/proc/self/fd")) == fds and torch.equal(held[-1], tensors["f32"])
    assert len(way[1]) == (28 if way[0] == "mapped" else 0)  # 7 (not the empty one), f32 21 times
    with pytest.raises(ShardError, match=r"m\.safetensors has no tensor nope$"):
        f.read("nope")
    # the header is parsed once per version of the file: a rewritten file is read anew
    parsed = []
    real = S.StoredFile.__init__
    monkeypatch.setattr(S.StoredFile, "__init__", lambda self, p: parsed.append(p) or real(self, p))
    S._stored.cache_clear()
    for _ in range(3):
        S.read_tensor(path, "bf16")
    save_file({"f32": torch.ones(3, 5)}, path)
    assert torch.equal(S.read_tensor(path, "f32"), torch.ones(3, 5)) and len(parsed) == 2


def test_stored_file_refuses_a_damaged_file_in_one_line(tmp_path, way):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # the last two floats lost
    with pytest.raises(ShardError, match=r"is truncated: a has 248 of its 256 bytes$"):
        S.StoredFile(path).read("a")
    for bad in (b"\x05\x00", b"\xff" * 64, struct.pack("<Q", 2) + b"[]"):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(ShardError, match=r"^cannot read .*bad\.safetensors as safetensors"):
            S.StoredFile(tmp_path / "bad.safetensors")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["a"]["shape"] = [65]
    raw = json.dumps(header).encode()
    (tmp_path / "lies.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(ShardError, match=r"a's header gives 256 bytes for 260$"):
        S.StoredFile(tmp_path / "lies.safetensors").read("a")


def test_a_tensor_not_aligned_in_its_file_is_read_not_mapped(tmp_path, way):
    """A float32 tensor at an offset that is not a multiple of 4 cannot be a view of a map."""
    want = torch.randn(4)
    raw = json.dumps({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [3, 19]}}).encode()  # fmt: skip
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, so b starts at 3 mod 4
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([1, 2, 3]) + want.numpy().tobytes())
    f = S.StoredFile(path)
    assert torch.equal(f.read("b"), want) and f.read("a").tolist() == [1, 2, 3]
    assert len(way[1]) == (1 if way[0] == "mapped" else 0)  # a alone
