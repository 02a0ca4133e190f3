"""Run directories and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from lfm.config import Config
from lfm.core.io import atomic_path, file_sha256, write_json
from lfm.errors import LfmError
from lfm.runs import Run


class Cfg(Config):
    alpha: float = 0.5


def test_manifest_records_config_versions_inputs_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "in.txt"
    data.write_bytes(b"hello")
    with Run("demo", Cfg(), inputs={"data": data}, root=tmp_path / "runs") as run:
        run.log(accuracy=0.75)
        with run.output("result.txt") as tmp:
            tmp.write_text("ok")
    m = json.loads((run.path / "manifest.json").read_text())
    assert run.path.name.endswith("-demo") and run.path.parent == tmp_path / "runs"
    assert m["config"] == {"alpha": 0.5} and m["config_class"] == "Cfg"
    assert m["inputs"]["data"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert m["metrics"] == {"accuracy": 0.75} and m["status"] == "done"
    assert m["outputs"] == ["result.txt"] and (run.path / "result.txt").read_text() == "ok"
    assert {"torch", "transformers", "python"} <= set(m["versions"])


def test_failed_run_is_marked_and_leaves_no_partial_output(tmp_path):
    with (
        pytest.raises(RuntimeError),
        Run("boom", {"a": 1}, root=tmp_path) as run,
        run.output("model") as tmp,
    ):
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert not (run.path / "model").exists()
    assert [p.name for p in run.path.iterdir()] == ["manifest.json"]
    assert json.loads((run.path / "manifest.json").read_text())["status"].startswith(
        "failed: RuntimeError"
    )


def test_atomic_path_replaces_existing_folder_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("2")
        raise ValueError
    assert (target / "a").read_text() == "1"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_path_never_puts_a_file_over_a_folder_or_a_folder_over_a_file(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    (folder / "keep").write_text("1")
    file.write_text("2")
    to_folder = r"folder is a folder, and what is written there is a file; give another path"
    with pytest.raises(LfmError, match=to_folder), atomic_path(folder) as tmp:
        tmp.write_text("x")
    to_file = r"file is a file, and what is written there is a folder; give another path"
    with pytest.raises(LfmError, match=to_file), atomic_path(file) as tmp:
        tmp.mkdir()
    assert (folder / "keep").read_text() == "1" and file.read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no temporaries


def test_same_name_runs_get_distinct_folders(tmp_path):
    a = Run("x", root=tmp_path)
    b = Run("x", root=tmp_path)
    assert a.path != b.path


def test_file_hash_is_remembered_and_refreshed(tmp_path, monkeypatch):
    from lfm.core import io

    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(io, "MEMO_OVER", 0)  # remember even one-byte files
    f, g = tmp_path / "f", tmp_path / "g"
    f.write_bytes(b"a")
    g.write_bytes(b"c")
    assert file_sha256(f) == hashlib.sha256(b"a").hexdigest()
    assert file_sha256(g) == hashlib.sha256(b"c").hexdigest()
    memo = tmp_path / "cache" / "hashes"
    assert len(list(memo.iterdir())) == 2  # both files are remembered
    reads = []
    real = io.sha256_of
    monkeypatch.setattr(io, "sha256_of", lambda p, c=1 << 22: reads.append(p) or real(p, c))
    assert file_sha256(f) == hashlib.sha256(b"a").hexdigest()
    assert file_sha256(g) == hashlib.sha256(b"c").hexdigest()
    assert reads == []  # both answered from the memo, neither file read again
    f.write_bytes(b"bb")  # size changes, so the remembered hash must not be reused
    assert file_sha256(f) == hashlib.sha256(b"bb").hexdigest()
    os.utime(g, ns=(1, 1))  # so does the modification time
    assert file_sha256(g) == hashlib.sha256(b"c").hexdigest()
    assert reads == [f.resolve(), g.resolve()]
    write_json(tmp_path / "j.json", {"k": 1})
    assert json.loads((tmp_path / "j.json").read_text()) == {"k": 1}


def test_processes_hashing_at_once_all_get_their_hashes(tmp_path):
    import subprocess
    import sys

    files = []
    for i in range(6):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * (1 << 20))
    code = "import sys; from lfm.core.io import file_sha256\nfor p in sys.argv[1:]: print(file_sha256(p))"
    env = {**os.environ, "LFM_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, files[i::3])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]  # fmt: skip
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and err == ""
        assert out.split() == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files[i::3]]
    assert len(list((tmp_path / "cache" / "hashes").iterdir())) == 6  # none lost


def test_a_memo_that_cannot_be_written_costs_only_a_rehash(tmp_path, monkeypatch):
    from lfm.core import cache, io

    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(io, "MEMO_OVER", 0)
    f = tmp_path / "f"
    f.write_bytes(b"a")

    def contended(*args, **kwargs):  # other processes keep replacing the entry
        raise LfmError("cannot put the cache entry in place: other processes keep writing it")

    monkeypatch.setattr(cache, "write", contended)
    assert file_sha256(f) == hashlib.sha256(b"a").hexdigest()


def test_small_files_are_hashed_without_the_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "f"
    f.write_bytes(b"a")
    assert file_sha256(f) == hashlib.sha256(b"a").hexdigest()
    assert not (tmp_path / "cache" / "hashes").exists()


def test_resuming_keeps_the_manifest_and_checks_the_config(tmp_path):
    from lfm.errors import LfmError

    with Run("r", Cfg(), root=tmp_path) as first:
        first.log(step=3)
    again = Run("r", Cfg(), path=first.path)
    m = json.loads((again.path / "manifest.json").read_text())
    assert m["metrics"] == {"step": 3} and m["status"] == "running" and len(m["resumed"]) == 1
    with pytest.raises(LfmError, match="holds another config"):
        Run("r", Cfg(alpha=0.1), path=first.path)


def test_resuming_refuses_an_input_that_changed_but_not_one_that_moved(tmp_path):
    from lfm.errors import LfmError

    data = tmp_path / "data.txt"
    data.write_text("one")
    with Run("r", Cfg(), inputs={"data": data}, root=tmp_path / "runs") as first:
        pass
    moved = tmp_path / "moved.txt"
    moved.write_text("one")
    Run("r", Cfg(), inputs={"data": moved}, path=first.path)  # the same bytes elsewhere
    data.write_text("two")
    with pytest.raises(LfmError, match=r"data\.txt has changed since the run began"):
        Run("r", Cfg(), inputs={"data": data}, path=first.path)


def test_run_directories_are_created_exclusively(tmp_path, monkeypatch):
    """Two runs started in the same second get two directories (no shared manifest)."""
    import multiprocessing as mp

    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")
    runs = [Run("same", {"i": i}, root=tmp_path) for i in range(3)]
    assert len({r.path for r in runs}) == 3
    assert [json.loads((r.path / "manifest.json").read_text())["config"]["i"] for r in runs] == [
        0,
        1,
        2,
    ]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_start_run, [(str(tmp_path / "mp"), i) for i in range(6)])
    assert len(set(paths)) == 6


def _start_run(arg):
    """Create a run directory under one fixed name, as processes of the same second would."""
    from pathlib import Path

    from lfm.core.runs import _create

    root, _i = arg
    return str(_create(Path(root) / "20260101-000000-race"))


def test_folder_inputs_and_parents_are_recorded(tmp_path, monkeypatch):
    from lfm.core.runs import path_sha256

    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"1")
    (folder / "b.bin").write_bytes(b"2")
    run = Run("child", {}, inputs={"model": folder}, root=tmp_path / "runs", parents=["p1"])
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["parents"] == ["p1"] and run.id == run.path.name
    first = m["inputs"]["model"]["sha256"]
    assert first == path_sha256(folder)
    (folder / "b.bin").write_bytes(b"3")
    assert path_sha256(folder) != first


def test_tensor_files_carry_a_format_tag(tmp_path):
    import torch

    from lfm.core.io import load_tensors, read_meta, save_tensors
    from lfm.errors import LfmError

    path = save_tensors(tmp_path / "p.safetensors", {"w": torch.ones(2)}, "lfm.test/1", layer=3)
    tensors, meta = load_tensors(path, "lfm.test/1")
    assert torch.equal(tensors["w"], torch.ones(2)) and meta == {"format": "lfm.test/1", "layer": 3}
    with pytest.raises(LfmError, match=r"is not a lfm.other/1 file .*'lfm.test/1'"):
        load_tensors(path, "lfm.other/1")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LfmError, match=r"cannot read .*bad.safetensors"):
        read_meta(tmp_path / "bad.safetensors")


def test_parents_are_found_from_inputs_inside_run_directories(tmp_path):
    first = Run("make", {}, root=tmp_path)
    with first.output("model.bin") as tmp:
        tmp.write_bytes(b"w")
    other = tmp_path / "elsewhere.bin"
    other.write_bytes(b"x")
    second = Run(
        "use", {}, inputs={"model": first.path / "model.bin", "data": other}, root=tmp_path
    )
    m = json.loads((second.path / "manifest.json").read_text())
    assert m["parents"] == [first.id]
    assert Run("given", {}, inputs={"model": first.path / "model.bin"}, root=tmp_path,
               parents=[]).manifest["parents"] == []  # fmt: skip


def test_ancestry_needs_the_run_and_lists_a_lost_parent_as_missing(tmp_path):
    from lfm.core.runs import ancestry
    from lfm.errors import LfmError

    parent = Run("parent", {}, root=tmp_path / "nested")
    child = Run("child", {}, root=tmp_path, parents=[parent.id, "gone"])
    chain = ancestry(child.id, tmp_path)  # the parent is found below the root
    assert [(d, m["id"], m.get("status")) for d, m in chain] == [
        (0, child.id, "running"), (1, parent.id, "running"), (1, "gone", "missing"),
    ]  # fmt: skip
    with pytest.raises(LfmError, match="no run 'nope'"):
        ancestry("nope", tmp_path)


def test_history_is_kept_in_the_manifest_and_drawn_as_curves(tmp_path):
    from PIL import Image

    with Run("curves", root=tmp_path) as run:
        run.history("loss", [2.0, 1.5, float("nan"), 1.0])
        run.history("accuracy", [0.2, 0.6], steps=[10, 20], xlabel="meta-update")
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["history"]["loss"] == {
        "step": [1, 2, 3, 4], "value": [2.0, 1.5, None, 1.0], "xlabel": "step"
    }  # fmt: skip
    assert manifest["history"]["accuracy"]["step"] == [10, 20]
    assert "curves.png" in manifest["outputs"]
    with Image.open(run.path / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]  # two panels side by side
    with pytest.raises(ValueError, match="3 values for 2 steps"):
        run.history("bad", [1.0, 2.0, 3.0], steps=[1, 2])
