"""`lfm tuning train` under `accelerate launch` with the shipped DDP config, on two CPU processes.

The command documented in examples/accelerate/ddp.yaml, run as it is written (`-m lfm`), with
`--num_processes 2` on a machine without GPUs: torchrun starts two processes (each writes its
stdout to its own log, `--log_dir`) that lfm's loop runs as multi-CPU over gloo. Only the main
process writes the run directory and reports; the adapter it saved gives, loaded again, the
held-out accuracy it reported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lfm.core.tiny import tiny_lm
from lfm.tuning import recipes
from lfm.tuning.adapters import ADAPTER_FILE
from lfm.tuning.tasks import held_out

from conftest import BBC_WORDS, CORPUS

DDP = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "ddp.yaml"
LABELS = ("business", "politics", "sport")  # single tokens of the tokenizer below


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    """A seeded tiny Llama saved as a folder, whose tokenizer has the label words as tokens."""
    model, tok = tiny_lm("llama", 0, corpus=[BBC_WORDS * 40, *CORPUS])
    path = tmp_path_factory.mktemp("lm") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _write(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(per_class: int) -> list[dict[str, str]]:
    words = {"business": "shares and profit", "politics": "the vote and the party",
             "sport": "the match and the cup"}  # fmt: skip
    return [{"text": f"item {i}: {words[label]} of {label}", "label": label}
            for i in range(per_class) for label in LABELS]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lfm_tuning_train_under_accelerate_launch_on_two_cpu_processes(lm, tmp_path):
    data, root = _write(tmp_path / "d.jsonl", _rows(10)), tmp_path / "runs"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        "--log_dir", str(tmp_path / "logs"), "--tee", "1",  # each process's stdout in a file
        "-m", "lfm", "tuning", "train", "--method", "lora", "--model", lm, "--data", data,
        "--shots", "4", "--steps", "4", "--batch-size", "2", "--lr", "2e-2", "--ckpt-every", "2",
        "--eval-per-class", "0", "--max-chars", "60", "--threads", "1", "--root", str(root),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = sorted(tmp_path.glob("logs/*/attempt_0/*/stdout.log"), key=lambda p: p.parent.name)
    assert [p.parent.name for p in logs] == ["0", "1"], done.stdout  # two processes ran
    reports = [[ln for ln in p.read_text().splitlines() if ln.startswith("lora on ")] for p in logs]
    assert [len(r) for r in reports] == [1, 0], done.stdout  # the main process alone reports

    (run,) = root.iterdir()  # one run directory, from the main process
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and "finished" in manifest
    assert manifest["history"]["loss"]["step"] == [1, 2, 3, 4]
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 4
    adapter = load_file(str(run / "tuned" / "adapter" / ADAPTER_FILE))
    assert any((t != 0).any() for k, t in adapter.items() if "lora_B" in k)  # it trained

    ds = recipes.labelled_data(data, shots=4)  # the held-out examples the run evaluated
    texts, y = held_out(ds, 0)
    held = _write(tmp_path / "held.jsonl",
                  [{"text": t, "label": ds.classes[int(c)]} for t, c in zip(texts, y, strict=True)])  # fmt: skip
    again = recipes.predict(run, data=held, progress=False)  # the saved adapter, loaded again
    assert again["acc"] == pytest.approx(manifest["metrics"]["acc"])


@pytest.mark.slow
def test_lfm_distill_lm_under_accelerate_launch_writes_one_run(lm, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS * 30))
    root = tmp_path / "runs"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        "-m", "lfm", "distill", "lm", "--model", lm, "--data", str(text), "--every", "2",
        "--steps", "3", "--batch-size", "2", "--block-size", "16", "--eval-blocks", "2",
        "--root", str(root),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = root.iterdir()  # one run directory, from the main process
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["history"]["student_loss"]["step"] == [1, 2, 3]
    assert (run / "student" / "model.safetensors").is_file()
    assert done.stdout.count("perplexity teacher") == 1  # the main process alone reports


def test_the_cli_destroys_a_launched_commands_process_group_before_it_exits():
    """A process group left to the interpreter's exit can abort a finished gloo process; `main`
    ends it whatever the command did."""
    import torch.distributed as dist

    from lfm import cli

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        assert dist.is_initialized()
        cli._end_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cli._end_distributed()  # none: nothing to do
