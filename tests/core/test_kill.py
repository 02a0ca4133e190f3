"""A process killed mid-write leaves no half-written output, and the next start clears what it left.

Each test starts the work in a subprocess whose writer is made to stop for good right after it
has written into its temporary folder, SIGKILLs it there, checks the output is absent (or still
the previous whole one) with the killed process's `.<name>.pid<N>.<random>.tmp` beside it, then
starts the same work again and checks the output is whole and the leftover gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lfm.core import cache
from lfm.core.io import atomic_path
from lfm.core.runs import Run
from lfm.core.train import TrainConfig, train
from lfm.errors import LfmError

HERE = Path(__file__).resolve().parent

# Run in the subprocess before its work: `hang_after(obj, name, n)` makes the n-th call of
# `obj.name` write as usual, then signal READY and wait to be killed.
HANG = """
import sys, time
from pathlib import Path
READY = Path(sys.argv[1])
def hang_after(obj, name, n=1):
    real, calls = getattr(obj, name), []
    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= n:
            READY.touch()
            time.sleep(600)
        return out
    setattr(obj, name, wrapped)
"""


def _kill_midway(tmp_path: Path, body: str, env: dict[str, str] | None = None) -> None:
    """Run `body` in a subprocess until it signals, then SIGKILL it."""
    ready = tmp_path / "ready"
    code = HANG + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready)], env=env, cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 180
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not ready.exists():
        proc.kill()
        pytest.fail(f"the work never reached its write: {proc.communicate()[1].decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _leftovers(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f".{name}.pid*.tmp"))


# ---------------------------------------------------------------------------------------------
# Merge.


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE.parent))
    from conftest import make_lm

    root = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 0), ("b", 1)):
        model, tok = make_lm("llama", seed=seed)
        model.save_pretrained(root / name, max_shard_size="30KB")
        tok.save_pretrained(root / name)
    return root / "a", root / "b"


def test_a_killed_merge_leaves_no_output_and_the_next_merge_clears_it(tmp_path, two_models):
    from lfm.reuse import MergeError, merge_models

    a, b, out = *two_models, tmp_path / "out"
    _kill_midway(tmp_path, f"""
        from lfm.reuse import engine
        hang_after(engine.ShardWriter, "add", 3)
        engine.merge_models("linear", [{str(a)!r}, {str(b)!r}], {str(out)!r}, progress=False,
                            max_shard_size="40KB")
    """)  # fmt: skip
    assert not out.exists() and len(_leftovers(tmp_path, "out")) == 1
    merge_models("linear", [a, b], out, progress=False, max_shard_size="40KB")
    assert (out / "config.json").exists() and not _leftovers(tmp_path, "out")
    with pytest.raises(MergeError, match="exists; choose another folder"):
        merge_models("linear", [a, b], out, progress=False)


@pytest.mark.parametrize("folder", [True, False])
def test_a_rival_write_does_not_replace_an_output_that_appeared_meanwhile(tmp_path, folder):
    out = tmp_path / "out"
    first, second = atomic_path(out, replace=False), atomic_path(out, replace=False)
    paths = [first.__enter__(), second.__enter__()]  # two writers of one output, at once
    for p, text in zip(paths, ("first", "second"), strict=True):
        if folder:
            p.mkdir()
        ((p / "f") if folder else p).write_text(text)
    first.__exit__(None, None, None)
    with pytest.raises(LfmError, match="written by another process meanwhile; it is kept"):
        second.__exit__(None, None, None)
    assert ((out / "f") if folder else out).read_text() == "first"
    assert [q.name for q in tmp_path.iterdir()] == ["out"]


def test_a_leftover_of_a_live_process_is_not_swept(tmp_path):
    live = tmp_path / f".out.pid{os.getpid()}.abcd.tmp"
    dead = tmp_path / ".out.pid999999999.abcd.tmp"
    live.mkdir(), dead.mkdir()
    with atomic_path(tmp_path / "out") as tmp:
        tmp.write_text("x")
    assert live.exists() and not dead.exists()


def test_a_folder_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    from lfm.core.tmp import REPLACED, sweep

    left = tmp_path / ".out.pid999999999.abcd.tmp"
    (left / REPLACED).mkdir(parents=True)
    (left / REPLACED / "f").write_text("old")
    (left / "out").mkdir()  # the new folder, killed before its rename
    assert [p for p, _ in sweep(tmp_path)] == [left]
    assert (tmp_path / "out" / "f").read_text() == "old" and not left.exists()


# ---------------------------------------------------------------------------------------------
# Checkpoint.


class FrozenBase(nn.Module):
    """A frozen first layer under a trainable head, with buffers that training changes (an
    adapter's situation: its checkpoint needs only the head and the buffers)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(4, 16).requires_grad_(False)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.norm(self.base(x)))


def problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    batches = [(x[i : i + 8], x[i : i + 8].sum(1, keepdim=True)) for i in range(0, 32, 8)]
    return FrozenBase(), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), batches


CKPT = TrainConfig(steps=5, lr=1e-2, ckpt_every=1, progress=False)


def test_a_killed_checkpoint_keeps_the_last_whole_one_and_resume_ends_as_one_run(tmp_path):
    run_dir = tmp_path / "run"
    _kill_midway(tmp_path, f"""
        from lfm.core import train as T
        from lfm.core.runs import Run
        from test_kill import CKPT, problem
        hang_after(T, "save_file", 3)
        model, loss, batches = problem()
        T.train(model, loss, batches, CKPT, run=Run("t", {{}}, path={str(run_dir)!r}))
    """)  # fmt: skip
    (left,) = _leftovers(run_dir, "checkpoint")
    assert torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    assert set(load_file(left / "checkpoint" / "model.safetensors")) == {
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
        "norm.num_batches_tracked", "head.weight", "head.bias",
    }  # fmt: skip
    model, loss, batches = problem()
    hist = train(model, loss, batches, CKPT, run=Run("t", {}, path=run_dir))
    assert hist.start_step == 2 and not _leftovers(run_dir, "checkpoint")
    whole, loss, batches = problem()
    ref = train(whole, loss, batches, CKPT.replace(ckpt_every=0))
    assert hist.losses == ref.losses
    for k, v in whole.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------
# Edit and edit statistics.


def test_a_killed_edit_writes_no_patch_and_the_next_edit_clears_it(tmp_path):
    out, runs = tmp_path / "p.safetensors", tmp_path / "runs"
    body = f"""
        import safetensors.torch
        from lfm.edit import FTLConfig, common, recipes
        hang_after(safetensors.torch, "save_file")
        recipes.apply(common.smoke_model(), "ft_l", [common.SMOKE_REQUEST], {str(out)!r},
                      config=FTLConfig(steps=2, lr=0.03), root={str(runs)!r})
    """
    _kill_midway(tmp_path, body)
    assert not out.exists() and len(_leftovers(tmp_path, out.name)) == 1
    from lfm.edit import FTLConfig, common, recipes

    done = recipes.apply(common.smoke_model(), "ft_l", [common.SMOKE_REQUEST], out,
                         config=FTLConfig(steps=2, lr=0.03), root=runs)  # fmt: skip
    assert isinstance(recipes.load_patch(done.path), recipes.Patch)
    assert not _leftovers(tmp_path, out.name)


def test_a_killed_statistics_build_leaves_no_entry_and_the_next_build_clears_it(
    tmp_path, monkeypatch
):
    env = {"LFM_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("LFM_CACHE", env["LFM_CACHE"])
    _kill_midway(tmp_path, """
        import safetensors.torch
        from lfm.edit import common, stats
        stats.corpus_texts = lambda corpus: list(common.SMOKE_TEXTS)
        hang_after(safetensors.torch, "save_file")
        h = common.smoke_model()
        stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32)
    """, env)  # fmt: skip
    from lfm.edit import common, stats

    h = common.smoke_model()
    entry = stats.stats_path(h.model, 1, "tiny", 200, 32)
    assert not entry.exists() and len(_leftovers(entry.parent, entry.name)) == 1
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS))
    mom2 = stats.second_moment(h.model, h.tokenizer, 1, "tiny", 200, 32)
    params = stats._params(h.model, 1, "tiny", 200, 32)
    assert mom2.shape == (64, 64) and cache.read(stats.KIND, entry.name, params) == entry
    assert not _leftovers(entry.parent, entry.name)


# ---------------------------------------------------------------------------------------------
# Run directories.

_RUNS = """
import sys, time
from pathlib import Path
from lfm.core.runs import Run
go = Path(sys.argv[2])
(go.parent / f"ready-{sys.argv[1]}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(20):
    Run("same", {"who": sys.argv[1], "i": i}, root=sys.argv[3])
"""


def test_two_processes_starting_runs_at_once_never_share_a_directory(tmp_path):
    go, root = tmp_path / "go", tmp_path / "runs"
    args = [[sys.executable, "-c", _RUNS, str(i), str(go), str(root)] for i in (0, 1)]
    procs = [subprocess.Popen(a, stderr=subprocess.PIPE, text=True) for a in args]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.communicate()[1]
    configs = [json.loads((d / "manifest.json").read_text())["config"] for d in root.iterdir()]
    assert len(configs) == 40
    assert sorted((c["who"], c["i"]) for c in configs) == [
        (w, i) for w in ("0", "1") for i in range(20)
    ]
