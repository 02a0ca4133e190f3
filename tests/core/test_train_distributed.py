"""Two CPU processes (gloo) take the same steps as one process at the same global batch.

Accelerate 1.15 runs `accelerate launch --cpu --num_processes 2` as ONE process (its simple
launcher); two CPU processes need `--multi_gpu --num_processes 2` (torchrun), which on a machine
without GPUs (or with `TrainConfig(cpu=True)`) gives DistributedType.MULTI_CPU over gloo. The test
launches this file through Accelerate's launcher: each process trains a tiny Llama's
LoRA adapter on micro-batches of 4 with 2 accumulated per step, so a step sees 2·2·4 = 16 examples;
the reference is one process on batches of those same 16. Weights and the logged losses must agree,
and the main process alone must write the run directory and its checkpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfm.core.tiny import tiny_lm
from lfm.core.train import CHECKPOINT, TrainConfig, run_on_main, train
from lfm.tuning.classify import VerbalizerLM, ce_loss
from lfm.tuning.peft_methods import adapter

MICRO, ACCUM, WORLD, STEPS = 4, 2, 2, 3
LABEL_IDS = (10, 11, 12)  # three "label words" of a random-token classification task


def _tiny_batch(seed: int, n: int, length: int = 8) -> dict[str, torch.Tensor]:
    """Random token ids (no padding), a full mask and labels in range(len(LABEL_IDS))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 320, (n, length), generator=g)
    labels = torch.randint(0, len(LABEL_IDS), (n,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    data = _tiny_batch(3, n=8 * MICRO)
    return [{k: v[i : i + MICRO] for k, v in data.items()} for i in range(0, 8 * MICRO, MICRO)]


def _global_batches() -> list[dict[str, torch.Tensor]]:
    """Micro-batches i·G .. i·G + G − 1 (G = ACCUM·WORLD) joined: what one step of all sees."""
    mbs, g = _micro_batches(), ACCUM * WORLD
    return [{k: torch.cat([b[k] for b in mbs[i : i + g]]) for k in mbs[0]} for i in range(0, 8, g)]


def _job(batches, accum: int, run=None):
    # no dropout: processes draw the same masks; the LoRA init is the seed's in every process
    lm = adapter(tiny_lm("llama", 0)[0], "lora", {"dropout": 0.0}, seed=0)
    model = VerbalizerLM(lm, LABEL_IDS)
    tcfg = TrainConfig(steps=STEPS, lr=1e-2, grad_accum=accum, ckpt_every=2, progress=False)
    hist = train(model, ce_loss, batches, tcfg.replace(cpu=True), run=run)
    return model, hist


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), __file__, str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    assert two["world"] == WORLD and two["kind"] == "MULTI_CPU"

    torch.set_num_threads(1)
    one, hist = _job(_global_batches(), accum=1)
    for name, p in _trainable(one).items():
        torch.testing.assert_close(two["weights"][name], p, rtol=1e-4, atol=1e-5)
    assert any((p != 0).any() for n, p in _trainable(one).items() if "lora_B" in n)  # it trained
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(hist.losses), rtol=1e-5, atol=1e-6
    )
    runs = [p for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 1, runs  # one run directory, from the main process
    state = torch.load(runs[0] / CHECKPOINT / "state.pt", weights_only=True)
    assert state["step"] == STEPS and len(state["losses"]) == STEPS


def _worker(out: Path) -> None:
    from accelerate import PartialState

    torch.set_num_threads(1)
    run = run_on_main("dist", root=out / "runs")
    model, hist = _job(_micro_batches(), accum=ACCUM, run=run)
    state = PartialState()
    if run is not None:
        result = {"weights": _trainable(model), "losses": hist.losses}
        kind = state.distributed_type.value
        torch.save({**result, "world": state.num_processes, "kind": kind}, out / "result.pt")
    # leave together and close gloo before exit: a process that exits with the group still up
    # can abort in gloo's threads at interpreter teardown
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
