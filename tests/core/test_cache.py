"""The cache: entries with a marker, checked on every read, rebuilt when damaged; `lfm cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lfm.cli import app
from lfm.core import cache
from lfm.core.io import file_sha256
from lfm.edit import common, stats
from lfm.errors import LfmError

PARAMS = {"a": 1, "dims": (2, 3)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))


def _build(text: str = "hello"):
    calls = []

    def build(folder):
        calls.append(1)
        (folder / "x.txt").write_text(text)

    return build, calls


def test_an_entry_is_built_once_with_its_marker_and_read_back(tmp_path):
    build, calls = _build()
    path = cache.get("t", "k", PARAMS, build)
    assert path == tmp_path / "cache" / "t" / "k" and (path / "x.txt").read_text() == "hello"
    marker = json.loads((path / cache.MARKER).read_text())
    assert marker["params"] == {"a": 1, "dims": [2, 3]} and marker["kind"] == "t"
    assert marker["files"]["x.txt"]["sha256"] == file_sha256(path / "x.txt")
    assert cache.get("t", "k", PARAMS, build) == path and calls == [1]
    assert [p.name for p in path.parent.iterdir()] == ["k"]  # no temporary folder left


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "x.txt").write_text("hel"), "has 3 bytes, not 5"),
        (lambda p: (p / "x.txt").write_bytes(b"\0" * 5), "does not match its SHA-256"),
        (lambda p: (p / "x.txt").unlink(), "x.txt is missing"),
        (lambda p: (p / cache.MARKER).write_text("{"), "unreadable lfm-entry.json"),
        (lambda p: (p / cache.MARKER).unlink(), "no lfm-entry.json"),
    ],
)
def test_a_damaged_entry_is_reported_in_one_line_and_rebuilt(capsys, damage, reason):
    build, calls = _build()
    path = cache.get("t", "k", PARAMS, build)
    damage(path)
    assert cache.get("t", "k", PARAMS, build) == path and calls == [1, 1]
    assert (path / "x.txt").read_text() == "hello"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: cache entry t/k fails its check") and reason in line


def test_an_entry_made_with_other_parameters_is_rebuilt(capsys):
    build, calls = _build()
    cache.get("t", "k", PARAMS, build)
    cache.get("t", "k", {**PARAMS, "a": 2}, build)
    assert calls == [1, 1] and "made with" in capsys.readouterr().err


def test_a_large_file_is_rehashed_only_when_its_size_or_mtime_changed(monkeypatch):
    monkeypatch.setattr(cache, "REHASH_OVER", 2)
    build, calls = _build()
    path = cache.get("t", "k", PARAMS, build)
    st = (path / "x.txt").stat()
    (path / "x.txt").write_text("HELLO")  # same size, new mtime: hashed, caught
    assert cache.get("t", "k", PARAMS, build) == path and calls == [1, 1]
    hashed = []
    monkeypatch.setattr(cache, "sha256_of", lambda f: hashed.append(f) or "")
    cache.get("t", "k", PARAMS, build)
    assert hashed == [] and st.st_size == 5  # unchanged: not hashed again


def test_a_check_that_fails_on_what_was_just_built_is_an_error():
    def check(folder):
        raise cache.BadEntry("wrong shape")

    with pytest.raises(LfmError, match=r"cache entry t/k was built wrong \(wrong shape\)"):
        cache.get("t", "k", PARAMS, _build()[0], check=check)
    assert cache.read("t", "k", PARAMS) is None


def _stats_setup(monkeypatch):
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    calls = []

    def compute(*args):
        calls.append(1)
        return {1: torch.eye(64, dtype=torch.float64)}

    def get():
        return stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32, compute=compute)

    get()
    return stats.stats_path(h.model, 1, "tiny", 200, 32), get, calls


def _rewrite(entry, mom2):
    """Replace C with `mom2` and re-seal the marker, as a wrong entry with a good hash."""
    save_file({"mom2": mom2}, str(entry / stats.FILE), {"format": stats.FORMAT})
    marker = json.loads((entry / cache.MARKER).read_text())
    cache._write_marker(entry, marker["kind"], marker["key"], marker["params"])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda e: (e / stats.FILE).write_bytes((e / stats.FILE).read_bytes()[:100]), "bytes"),
        (lambda e: (e / stats.FILE).write_bytes(bytes((e / stats.FILE).stat().st_size)), "SHA"),
        (lambda e: _rewrite(e, torch.eye(8, dtype=torch.float64)), "shape (8, 8), not (64, 64)"),
        (lambda e: _rewrite(e, torch.full((64, 64), float("nan"))), "NaN or infinite"),
    ],
)
def test_damaged_edit_statistics_are_rebuilt_not_used(monkeypatch, capsys, damage, reason):
    entry, get, calls = _stats_setup(monkeypatch)
    damage(entry)
    assert torch.equal(get(), torch.eye(64, dtype=torch.float64)) and calls == [1, 1]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"edit-stats/{entry.name}" in line and reason in line


def test_statistics_that_come_out_non_finite_are_an_error_not_an_entry(monkeypatch):
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    h = common.smoke_model()
    nan = {1: torch.full((64, 64), float("nan"), dtype=torch.float64)}
    with pytest.raises(LfmError, match="NaN or infinite"):
        stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32, compute=lambda *a: nan)
    assert not stats.stats_path(h.model, 1, "tiny", 200, 32).exists()


def test_cache_clear_removes_only_lfm_entries_and_says_what_it_left(tmp_path):
    root = tmp_path / "cache"
    cache.get("t", "k", PARAMS, _build()[0])
    (root / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("mine")
    (root / "t" / "own").mkdir()  # a folder without a marker, beside an entry
    dead = root / "t" / ".k.pid999999999.abcd1234.tmp"  # left by a killed writer
    dead.mkdir()
    listing = CliRunner().invoke(app, ["cache"])
    assert listing.exit_code == 0, listing.output
    assert (
        "t/k" in listing.output and "notes.txt" in listing.output and "1 entries" in listing.output
    )
    res = CliRunner().invoke(app, ["cache", "--clear"])
    assert res.exit_code == 0, res.output
    assert "removed t/k" in res.output and "removed t/.k.pid999999999" in res.output
    assert "left notes.txt" in res.output and "no lfm marker" in res.output
    assert (root / "notes.txt").read_text() == "mine" and (root / "t" / "own").is_dir()
    assert not (root / "t" / "k").exists() and not dead.exists()


_BUILDER = """
import os, sys, time
from pathlib import Path
from lfm.core import cache
def build(folder):
    with open(folder / "data.bin", "wb") as f:
        for i in range(20):
            f.write(bytes([i]) * 50_000)
            f.flush()
            time.sleep(0.01)
go = Path(sys.argv[2])
(go.parent / f"ready-{sys.argv[1]}").touch()
while not go.exists():
    time.sleep(0.005)
for _ in range(3):  # the first builds (both at once), the others read
    path = cache.get("t", "shared", {"n": 20}, build)
    data = (path / "data.bin").read_bytes()
    assert data == b"".join(bytes([i]) * 50_000 for i in range(20)), "read a half-written entry"
print("ok")
"""


def test_two_processes_building_the_same_entry_both_end_with_a_sound_one(tmp_path):
    env = {**os.environ, "LFM_CACHE": str(tmp_path / "cache")}
    code, go = textwrap.dedent(_BUILDER), tmp_path / "go"
    args = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i), str(go)], **args) for i in (0, 1)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start building at once
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err
    path = cache.get("t", "shared", {"n": 20}, lambda f: pytest.fail("rebuilt a sound entry"))
    assert (path / "data.bin").stat().st_size == 1_000_000
    assert [p.name for p in path.parent.iterdir()] == ["shared"]
