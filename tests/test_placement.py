"""`--device` and `--dtype`: devices this machine lacks are one line; models load in the dtype
asked for; a ROME edit, a TIES merge, LoRA tuning and LM distillation run in bfloat16 on the CPU
and agree with float32 within what bfloat16 allows, with the wide numerics kept wide."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

from lfm.access import Access, LocalModel
from lfm.assets import load_model
from lfm.core import placement
from lfm.core.runs import Run
from lfm.core.train import TrainConfig
from lfm.distill.lm import (
    LMStudentConfig,
    lm_kd_loss,
    lm_student,
    student_config,
    student_from_config,
)
from lfm.edit import RomeConfig, common, rome
from lfm.errors import LfmError
from lfm.registry import run
from lfm.reuse import merge_state_dicts
from lfm.tuning.tasks import TextClassification, Verbalizer
from lfm.tuning.tiny import WORDS, tiny_news_lm

from conftest import make_lm

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_a_device_this_machine_lacks_is_an_error(name):
    with pytest.raises(LfmError, match="no CUDA device"):
        placement.resolve_device(name)


def test_device_and_dtype_names():
    assert placement.resolve_device("auto") == torch.device("cuda" if not NO_CUDA else "cpu")
    assert placement.resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("tpu", "gpu0", "xla"):
        with pytest.raises(LfmError, match="device"):
            placement.resolve_device(bad)
    cpu = torch.device("cpu")
    assert placement.resolve_dtype("bf16", cpu) is torch.bfloat16
    assert placement.resolve_dtype("float16", cpu) is torch.float16
    assert placement.resolve_dtype("auto", cpu) is torch.float32  # no bfloat16 GPU here
    with pytest.raises(LfmError, match="unknown dtype 'int8'"):
        placement.resolve_dtype("int8", cpu)


def test_models_load_in_the_dtype_asked_for_or_the_process_default(tmp_path):
    model, tok = make_lm("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def dtype(handle) -> torch.dtype:
        return next(handle.model.parameters()).dtype

    assert dtype(load_model(tmp_path)) is torch.float32
    assert dtype(load_model(tmp_path, dtype="bfloat16")) is torch.bfloat16
    with placement.placed(dtype="bf16"):
        assert dtype(load_model(tmp_path)) is torch.bfloat16
        with Run("probe", {}, root=tmp_path / "runs") as r:  # the manifest records it
            want = {"device": "cpu", "dtype": "bfloat16", "autocast": "bfloat16"}
            assert r.manifest["placement"] == want
    with placement.placed(dtype="bf16", training=True):  # a training command: float32 weights
        assert dtype(load_model(tmp_path)) is torch.float32
        assert placement.current().mixed_precision == "bf16"
    assert dtype(load_model(tmp_path)) is torch.float32  # the block's default is gone


def test_the_cli_refuses_a_missing_device_in_one_line():
    if not NO_CUDA:
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "lfm", "info", "--device", "cuda"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == "error: --device cuda: this machine has no CUDA device; use cpu or auto"
    )


def _margin(h: LocalModel) -> float:
    s = h.score([common.SMOKE_REQUEST.prompt] * 2, [" Rome", " Paris"])
    return float(s[0] - s[1])


def test_rome_in_bfloat16_edits_as_in_float32():
    strong = dict(v_weight_decay=0.0, clamp_norm=1e4, kl_factor=0.0, v_lr=1.0, v_steps=30,
                  n_prefixes=3, layer=0)  # fmt: skip
    margins = {}
    for dt in (torch.float32, torch.bfloat16):
        h = common.smoke_model("llama", 1)
        cov = common.smoke_cov(h.model, h.tokenizer, 0)  # C in float64, from float32 weights
        h.model.to(dt)
        before = {k: v.clone() for k, v in h.model.state_dict().items()}
        undo = rome(h, common.SMOKE_REQUEST, RomeConfig(**strong), cov=cov).apply(h.model)
        assert next(h.model.parameters()).dtype is dt
        margins[dt] = (_margin(h), before)
        undo.revert(h.model)
        assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    assert margins[torch.float32][0] > 0.3  # " Rome" now leads " Paris"
    assert margins[torch.bfloat16][0] == pytest.approx(margins[torch.float32][0], abs=0.03)


def _zoo() -> tuple[dict, list[dict]]:
    base, _ = make_lm("llama", 0)
    sds = []
    for seed in (1, 2, 3):
        m, _ = make_lm("llama", 0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        sds.append(m.state_dict())
    return base.state_dict(), sds


@pytest.mark.parametrize(("method", "cfg"), [("ties", {"density": 0.3}), ("linear", {})])
def test_merges_in_bfloat16_compute_in_float32_and_store_bfloat16(method, cfg):
    base, sds = _zoo()

    def bf16(sd):
        return {k: v.bfloat16() for k, v in sd.items()}

    f32 = merge_state_dicts(method, base, sds, cfg)
    b16 = merge_state_dicts(method, bf16(base), [bf16(sd) for sd in sds], cfg)
    assert {v.dtype for v in b16.values()} == {torch.bfloat16}
    # the arithmetic is float32 on the bfloat16 inputs, only the result is rounded
    up = merge_state_dicts(method, {k: v.float() for k, v in bf16(base).items()},
                           [{k: v.float() for k, v in bf16(sd).items()} for sd in sds], cfg)  # fmt: skip
    assert all(torch.equal(b16[k], up[k].bfloat16()) for k in b16)
    # and it agrees with the float32 merge but for entries at the trim threshold
    err = sum(float((f32[k] - b16[k].float()).norm() ** 2) for k in f32)
    rel = math.sqrt(err / sum(float(f32[k].norm() ** 2) for k in f32))
    off = sum(
        int(((f32[k] - b16[k].float()).abs() > 8e-3 * f32[k].abs() + 1e-4).sum()) for k in f32
    )
    assert rel < 0.05 and off / sum(v.numel() for v in f32.values()) < 0.01


def _random_task() -> TextClassification:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (8, 8), generator=g)
    labels = torch.randint(0, len(WORDS), (8,), generator=g)
    tok = tiny_news_lm(0).tokenizer
    return TextClassification([tok.decode(r) for r in ids], labels, Verbalizer("{text}", WORDS))


def test_lora_under_a_chosen_bfloat16_autocasts_and_learns_as_float32():
    hist = {}
    for dtype in ("float32", "bfloat16"):  # one process, two precisions: Accelerate is reset
        with placement.placed(device="cpu", dtype=dtype):
            cfg = TrainConfig(steps=12, lr=1e-2, progress=False)
            hist[dtype] = run("tuning", "lora", tiny_news_lm(0), _random_task(), train_cfg=cfg,
                              batch_size=8).history  # fmt: skip
    a, b = hist["float32"], hist["bfloat16"]
    assert a != b  # the autocast ran: bfloat16 matmuls round differently
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 2e-2
    assert sum(b[-3:]) / 3 < b[0] - 0.05


def test_training_on_the_cpu_after_an_accelerator_gets_a_state_on_the_cpu():
    """A process that trained on the GPU and then trains on the CPU (`bench/gpu.py`, a notebook)
    must train on the CPU: Accelerate keeps its first device for the process and refuses
    `cpu=True` after it. The GPU's state is stood in for by the shared state's device."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    from lfm.core.train import _accelerator

    Accelerator()  # a state made as on a machine with a GPU ...
    PartialState._shared_state["device"] = torch.device("cuda", 0)  # ... which it was
    try:
        with placement.placed(device="cpu", dtype="float32", training=True):
            acc = _accelerator(TrainConfig(progress=False))
        assert acc.device.type == "cpu"
        assert PartialState().device.type == "cpu"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def sharp_teacher():
    from transformers import AutoModelForCausalLM

    from lfm.core.tiny import tiny_config

    _, tok = make_lm("llama")
    cfg = tiny_config("llama", len(tok))
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # sharpen the random teacher so that its distributions carry signal
        teacher.model.norm.weight.mul_(20.0)
    return teacher, tok


def test_lm_distillation_in_bfloat16_autocast(sharp_teacher):
    teacher, tok = sharp_teacher
    blocks = torch.randint(3, 300, (16, 12), generator=torch.Generator().manual_seed(2))
    cfg = LMStudentConfig(every=2, kd_weight=1.0, lm_weight=0.0, batch_size=4, temperature=1.0)
    before = student_from_config(student_config(teacher, [0, 1]), seed=3)
    with torch.no_grad():
        t = teacher(input_ids=blocks).logits

    def gap(m):
        with torch.no_grad():
            return lm_kd_loss(m(input_ids=blocks).logits, t, blocks, cfg)["kd"].item()

    hist = {}
    for dtype in ("float32", "bfloat16"):
        student = copy.deepcopy(before)
        with placement.placed(device="cpu", dtype=dtype):
            res = lm_student(LocalModel(teacher, tok), student, blocks, cfg,
                             train_cfg=TrainConfig(steps=20, lr=2e-2, progress=False))  # fmt: skip
        assert next(student.parameters()).dtype is torch.float32  # float32 master weights
        assert gap(student) < 0.5 * gap(before)
        hist[dtype] = res.history
    assert hist["float32"] != hist["bfloat16"]


def test_meta_learning_under_a_chosen_bfloat16_autocasts_with_float32_meta_gradients():
    from lfm.meta.models import MLP
    from lfm.meta.tasks import SinusoidTasks
    from lfm.meta.train import meta_test

    hist, score = {}, {}
    torch.manual_seed(0)
    start = meta_test(MLP(1, 1, (40, 40)), SinusoidTasks(5, 20), "maml", n_tasks=40)["mean"]
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        with placement.placed(device="cpu", dtype=dtype, training=True):  # as `--dtype` sets it
            res = run("meta", "maml", MLP(1, 1, (40, 40)), SinusoidTasks(5, 10),
                      cfg={"steps": 200, "meta_batch": 5, "outer_lr": 0.01}, seed=0)  # fmt: skip
            score[dtype] = meta_test(res, SinusoidTasks(5, 20), n_tasks=40)["mean"]
        assert all(p.dtype is torch.float32 for p in res.model.parameters())  # θ stays float32
        hist[dtype] = res.history.loss
    a, b = hist["float32"], hist["bfloat16"]
    assert a != b  # the autocast ran: bfloat16 matmuls round differently
    # the same tasks: the early meta-losses agree to bfloat16's rounding, before the two
    # trajectories part (as two float32 runs on other hardware would)
    assert max(abs(x - y) / max(abs(x), 1.0) for x, y in zip(a[:20], b[:20], strict=True)) < 0.05
    assert score["float32"] != score["bfloat16"]
    assert score["bfloat16"] < 0.8 * start  # it meta-learns in bfloat16
    assert abs(score["float32"] - score["bfloat16"]) < 0.1 * score["float32"]


def test_data_free_meta_learning_under_a_chosen_bfloat16_autocast():
    from lfm.meta.datafree import DataFreeConfig, pool_example

    hist = {}
    for dtype in ("float32", "bfloat16"):
        ex = pool_example(DataFreeConfig)(Access.WEIGHTS, 0)
        with placement.placed(device="cpu", dtype=dtype, training=True):
            res = run("meta", "datafree_whitebox", *ex.args, cfg=ex.cfg.model_copy(
                update={"steps": 6}), seed=0)  # fmt: skip
        assert all(p.dtype is torch.float32 for p in res.model.parameters())
        hist[dtype] = res.history.loss
    a, b = hist["float32"], hist["bfloat16"]
    assert a != b
    assert max(abs(x - y) / max(abs(x), 1.0) for x, y in zip(a, b, strict=True)) < 0.05


@pytest.mark.parametrize("method", ["deep_inversion", "dafl", "dfad", "dfme"])
def test_data_free_distillation_under_a_chosen_bfloat16_autocast(method):
    from lfm.registry import get

    spec = get(method, area="distill")
    got = {}
    for dtype in ("float32", "bfloat16"):
        ex = spec.example(spec.access, 0)
        with placement.placed(device="cpu", dtype=dtype, training=True):
            res = run(spec.key, *ex.args, cfg=ex.cfg, **ex.kwargs)
        assert all(p.dtype is torch.float32 for p in res.student.parameters())
        got[dtype] = torch.cat([p.detach().flatten() for p in res.student.parameters()])
    a, b = got["float32"], got["bfloat16"]
    assert not torch.equal(a, b)  # the autocast ran
    assert float((a - b).norm() / a.norm()) < 0.05
