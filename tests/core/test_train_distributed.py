"""Two CPU processes (gloo) take the same steps as one process at the same global batch.

Accelerate 1.15 runs `accelerate launch --cpu --num_processes 2` as ONE process (its simple
launcher); two CPU processes need `--multi_gpu --num_processes 2` (torchrun), which on a machine
without GPUs (or with `TrainConfig(cpu=True)`) gives DistributedType.MULTI_CPU over gloo. Each test
launches this file through Accelerate's launcher with one job:

- `lora`: each process trains a tiny Llama's LoRA adapter (a label-word classifier) on
  micro-batches of 4 with 2 accumulated per step, so a step sees 2·2·4 = 16 examples;
- `lm`: each process holds the same frozen tiny Llama teacher and trains its layer-dropped
  student (`lfm.distill.lm.lm_student`, KD + LM loss) on the same micro-batches of token blocks;
  `lm_student` draws them with `shuffled_batches`, whose order depends on the seed alone, so the
  stream of micro-batches of 4 cut from it is the stream of batches of 16 cut into fours.

The reference is one process on batches of those same 16. Weights and the logged losses must
agree, and the main process alone must write the run directory and its checkpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfm.access import LocalModel
from lfm.core.tiny import tiny_lm
from lfm.core.train import CHECKPOINT, TrainConfig, run_on_main, train
from lfm.distill.lm import LMStudentConfig, lm_student
from lfm.tuning.classify import VerbalizerLM, ce_loss
from lfm.tuning.peft_methods import adapter

MICRO, ACCUM, WORLD, STEPS = 4, 2, 2, 3
LABEL_IDS = (10, 11, 12)  # three "label words" of a random-token classification task
# 32 token blocks of 12: one pass over them is 2 steps at the global batch of 16, so the third
# step starts the second epoch (a new order) in both runs
BLOCKS, BLOCK_SIZE = 32, 12


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


def _lora_job(distributed: bool, run=None):
    """LoRA classification: micro-batches of MICRO, ACCUM per step, or one global batch a step."""
    # no dropout: processes draw the same masks; the LoRA init is the seed's in every process
    lm = adapter(tiny_lm("llama", 0)[0], "lora", {"dropout": 0.0}, seed=0)
    model = VerbalizerLM(lm, LABEL_IDS)
    batches, accum = (_micro_batches(), ACCUM) if distributed else (_global_batches(), 1)
    tcfg = TrainConfig(steps=STEPS, lr=1e-2, grad_accum=accum, ckpt_every=2, progress=False)
    hist = train(model, ce_loss, batches, tcfg.replace(cpu=True), run=run)
    return model, hist, {}


def _lm_job(distributed: bool, run=None):
    """LM distillation of a 2-block tiny Llama into its 1-block student (block 0), as above."""
    teacher, tok = tiny_lm("llama", 0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    blocks = torch.randint(3, 300, (BLOCKS, BLOCK_SIZE), generator=torch.Generator().manual_seed(5))
    batch, accum = (MICRO, ACCUM) if distributed else (MICRO * ACCUM * WORLD, 1)
    cfg = LMStudentConfig(every=2, block_size=BLOCK_SIZE, batch_size=batch)
    tcfg = TrainConfig(steps=STEPS, lr=1e-2, grad_accum=accum, ckpt_every=2, progress=False,
                       cpu=True)  # fmt: skip
    res = lm_student(LocalModel(teacher, tok), None, blocks, cfg, train_cfg=tcfg, run=run)
    kept = all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    return res.student, res.history, {"teacher_kept": kept}


JOBS = {"lora": _lora_job, "lm": _lm_job}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(job: str, out: Path) -> dict:
    """Run `job` in two gloo processes through Accelerate's launcher; the main one's result."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), __file__, job, str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(out / "result.pt", weights_only=True)
    assert two["world"] == WORLD and two["kind"] == "MULTI_CPU"
    return two


def _check_against_one_process(
    job: str, out: Path, loss_tol: dict[str, float]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The two-process run of `job` against one process at the same global batch: trainable
    weights within rtol 1e-4 / atol 1e-5, the logged losses within `loss_tol`, one run directory
    whose checkpoint is at the last step. Returns the main process's extras and the weights."""
    two = _launch_two(job, out)
    torch.set_num_threads(1)
    one, hist, _ = JOBS[job](distributed=False)
    weights = _trainable(one)
    assert weights.keys() == two["weights"].keys()
    for name, p in weights.items():
        torch.testing.assert_close(two["weights"][name], p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(hist.losses), **loss_tol)
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1, runs  # one run directory, from the main process
    state = torch.load(runs[0] / CHECKPOINT / "state.pt", weights_only=True)
    assert state["step"] == STEPS and len(state["losses"]) == STEPS
    return two["extra"], weights


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    _, weights = _check_against_one_process("lora", tmp_path, {"rtol": 1e-5, "atol": 1e-6})
    assert any((p != 0).any() for n, p in weights.items() if "lora_B" in n)  # it trained


@pytest.mark.slow
def test_lm_distillation_on_two_processes_matches_one_process(tmp_path):
    # losses of about 11 (5·KD + 2·LM): within 1e-5 absolute
    extra, weights = _check_against_one_process("lm", tmp_path, {"rtol": 0.0, "atol": 1e-5})
    assert extra["teacher_kept"]  # every process's teacher is frozen: not one weight moved
    start = tiny_lm("llama", 0)[0].state_dict()  # the student began as exact copies of these
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(weights[name], start[name], atol=1e-4)  # it trained


def _worker(job: str, out: Path) -> None:
    from accelerate import PartialState

    torch.set_num_threads(1)
    run = run_on_main("dist", root=out / "runs", cpu=True)
    model, hist, extra = JOBS[job](distributed=True, run=run)
    state = PartialState()
    if run is not None:
        result = {"weights": _trainable(model), "losses": hist.losses, "extra": extra}
        kind = state.distributed_type.value
        torch.save({**result, "world": state.num_processes, "kind": kind}, out / "result.pt")
    # leave together and close gloo before exit: a process that exits with the group still up
    # can abort in gloo's threads at interpreter teardown
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
