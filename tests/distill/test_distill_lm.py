"""Layer-dropped LM students: exact block copies, KD on every position, training, refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lfm.access import LocalModel, narrow
from lfm.core.layouts import get_layout, num_layers
from lfm.core.train import TrainConfig
from lfm.distill.lm import (
    LMStudentConfig,
    kept_blocks,
    lm_kd_loss,
    lm_loss,
    lm_student,
    perplexity,
    student_config,
    student_from_config,
    student_from_teacher,
    token_blocks,
)
from lfm.errors import AccessError, ConfigError

from conftest import deep_lm, make_lm


def _block(model, i: int) -> dict[str, torch.Tensor]:
    return model.get_submodule(get_layout(model).layers)[i].state_dict()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_student_holds_exact_copies_of_every_kth_block(kind):
    teacher, _ = deep_lm(kind)
    student = student_from_teacher(teacher, every=2, offset=1)
    assert num_layers(student) == 2 and kept_blocks(4, 2, 1) == [1, 3]
    for j, i in enumerate([1, 3]):
        s, t = _block(student, j), _block(teacher, i)
        assert s.keys() == t.keys()
        assert all(torch.equal(s[k], t[k]) for k in s)
    lay = get_layout(teacher)
    for name in (lay.embed, lay.final_norm):
        assert torch.equal(student.get_submodule(name).weight, teacher.get_submodule(name).weight)
    with torch.no_grad():  # a copy, not a view: the teacher is untouched by student updates
        student.get_submodule(lay.embed).weight.add_(1.0)
    assert not torch.equal(
        student.get_submodule(lay.embed).weight, teacher.get_submodule(lay.embed).weight
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_k1_student_gives_the_teachers_logits(kind):
    teacher, _ = deep_lm(kind)
    student = student_from_teacher(teacher, every=1).eval()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_offset_past_the_last_block_is_refused():
    with pytest.raises(ConfigError, match="no block"):
        kept_blocks(4, 2, 4)


def test_a_negative_offset_counts_from_the_top():
    assert kept_blocks(4, 2, -1) == [3] and kept_blocks(4, 1, -4) == [0, 1, 2, 3]
    assert kept_blocks(4, 2, -3) == kept_blocks(4, 2, 1) == [1, 3]
    with pytest.raises(ConfigError, match="give 0 … 3, or −4 … −1"):
        kept_blocks(4, 2, -5)


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_kd_and_lm_terms_by_hand():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0]]])  # (1, 3, V=3)
    t = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    ids = torch.tensor([[0, 2, 1]])
    cfg = LMStudentConfig(temperature=2.0, kd_weight=1.0, lm_weight=0.5)
    out = lm_kd_loss(s, t, ids, cfg)
    kd = 0.0
    for pos in range(3):  # every position, the last included
        p = _softmax(t[0, pos].tolist(), 2.0)
        q = _softmax(s[0, pos].tolist(), 2.0)
        kd += 4.0 * sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)) / 3
    lm = -sum(math.log(_softmax(s[0, pos].tolist(), 1.0)[ids[0, pos + 1]]) for pos in range(2)) / 2
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["lm"].item() == pytest.approx(lm, rel=1e-5)
    assert out["loss"].item() == pytest.approx(kd + 0.5 * lm, rel=1e-5)
    assert "kd" not in lm_kd_loss(s, t, ids, cfg.replace(kd_weight=0.0))


def test_token_blocks_join_texts_with_eos_and_cut():
    _, tok = make_lm("llama")
    texts = ["Paris is the capital of France.", "Tokyo is a large city in Japan."]
    blocks = token_blocks(tok, texts, block_size=4)
    flat = [*tok(texts[0], add_special_tokens=False)["input_ids"], tok.eos_token_id,
            *tok(texts[1], add_special_tokens=False)["input_ids"], tok.eos_token_id]  # fmt: skip
    assert blocks.shape == (len(flat) // 4, 4)
    assert blocks.flatten().tolist() == flat[: blocks.numel()]
    assert token_blocks(tok, texts, block_size=4, max_blocks=2).shape == (2, 4)


def test_perplexity_is_exp_of_the_lm_loss():
    teacher, _ = deep_lm("llama", 2)
    ids = torch.randint(3, 300, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = math.exp(lm_loss(teacher(input_ids=ids).logits, ids).item())
    assert perplexity(teacher, ids, batch_size=2) == pytest.approx(want, rel=1e-5)


def test_lm_student_moves_the_student_towards_the_teacher():
    teacher, tok = deep_lm("llama")
    with torch.no_grad():  # sharpen the random teacher so that its distributions carry signal
        teacher.model.norm.weight.mul_(20.0)
    blocks = torch.randint(3, 300, (16, 12), generator=torch.Generator().manual_seed(2))
    cfg = LMStudentConfig(every=2, kd_weight=1.0, lm_weight=0.0, batch_size=4, temperature=1.0)
    before = student_from_config(student_config(teacher, [0, 1]), seed=3)  # a random student
    student = copy.deepcopy(before)
    res = lm_student(LocalModel(teacher, tok), student, blocks, cfg,
                     train_cfg=TrainConfig(steps=20, lr=2e-2, progress=False))  # fmt: skip
    hist = res.history
    assert res.student is student and not teacher.training  # the teacher's mode is back
    assert all(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        t = teacher(input_ids=blocks).logits

        def gap(m):
            return lm_kd_loss(m(input_ids=blocks).logits, t, blocks, cfg)["kd"].item()

        assert gap(student) < 0.5 * gap(before)
    assert hist.losses[-1] < hist.losses[0]


def test_without_a_student_it_trains_the_layer_dropped_copy():
    teacher, tok = deep_lm("llama")
    blocks = torch.randint(3, 300, (8, 12), generator=torch.Generator().manual_seed(4))
    cfg = LMStudentConfig(every=2, offset=1, batch_size=4)
    res = lm_student(LocalModel(teacher, tok), None, blocks, cfg,
                     train_cfg=TrainConfig(steps=2, lr=1e-2, progress=False))  # fmt: skip
    assert num_layers(res.student) == 2 and not res.student.training
    assert len(res.history.losses) == 2
    copy_ = student_from_teacher(teacher, every=2, offset=1)
    assert not torch.equal(  # the trained student moved away from the copy it started as
        res.student.get_submodule("model.layers.0.mlp.up_proj").weight,
        copy_.get_submodule("model.layers.0.mlp.up_proj").weight,
    )


def test_a_text_handle_cannot_teach_an_lm_student():
    teacher, tok = deep_lm("llama", 2)
    handle = narrow(LocalModel(teacher, tok), "text")
    with pytest.raises(AccessError, match=r"distill/lm_student needs WEIGHTS access.*only TEXT"):
        lm_student(handle, None, torch.zeros(4, 8, dtype=torch.long))
