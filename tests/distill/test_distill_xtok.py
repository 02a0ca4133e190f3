"""Distillation across tokenizers (ULD + shared-vocabulary KL): alignment by text offsets on
hand-made strings, the losses against hand computations, refusals, and training."""

from __future__ import annotations

import math

import pytest
import torch

from lfm import registry
from lfm.access import Access, LocalModel, narrow
from lfm.core.layouts import num_layers
from lfm.core.tiny import CORPUS, bpe_tokenizer, tiny_lm
from lfm.core.train import TrainConfig
from lfm.distill.xtok import (
    STUDENT_CORPUS,
    ULDConfig,
    align,
    boundaries,
    check_vocabularies,
    decoded_boundaries,
    encode_texts,
    layer_dropped,
    shared_kl,
    shared_vocab,
    teacher_rows,
    text_blocks,
    uld,
    uld_distance,
)
from lfm.errors import ConfigError

# Multi-byte characters (é, ü, ï, 日本, an emoji), double spaces and new lines.
TEXTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Café über naïve — 日本 🙂 is a city,  e.g. Tokyo.\n\nRome!",
    "A small model learns from a large model through its interface.",
    "Kyoto is an old city; Madrid is the capital of Spain.",
]


def _student() -> LocalModel:
    model, tok = tiny_lm("llama", 1, corpus=STUDENT_CORPUS, vocab_size=300)
    return LocalModel(model, tok, "student")


def _teacher() -> LocalModel:
    return LocalModel(*tiny_lm("gemma3", 0), name="teacher")


# -- alignment on hand-made offsets ---------------------------------------------------------


def test_boundaries_skip_specials_and_tokens_that_straddle_a_character():
    # "Hello  world", SentencePiece style: BOS, "Hello", "▁▁", "world"
    assert boundaries([(0, 0), (0, 5), (5, 7), (7, 12)], 12) == {5: 1, 7: 2, 12: 3}
    # "café über", byte-level: "c" "af" "é" "Ġ+first byte of ü" "second byte of ü" "ber";
    # the token holding half of ü ends at 6 by its offsets but closes nothing
    smol = [(0, 1), (1, 3), (3, 4), (4, 6), (5, 6), (6, 9)]
    assert boundaries(smol, 9) == {1: 0, 3: 1, 4: 2, 6: 4, 9: 5}
    # an emoji in four byte tokens: only the last closes it
    assert boundaries([(7, 8), (8, 9), (8, 9), (8, 9), (8, 9), (9, 11)], 11) == {8: 0, 9: 4, 11: 5}
    # a gap (an offset trimmed of its space) closes nothing; the last token closes at the end only
    assert boundaries([(0, 5), (6, 12)], 12) == {12: 1}
    assert boundaries([(0, 3), (3, 5)], 6) == {3: 0}


def test_align_pairs_the_last_tokens_of_each_side_at_common_boundaries():
    # "café über": Gemma splits "caf" "é" "▁über"; the byte-level student splits as above
    teacher = boundaries([(0, 0), (0, 3), (3, 4), (4, 9)], 9)
    student = boundaries([(0, 1), (1, 3), (3, 4), (4, 6), (5, 6), (6, 9)], 9)
    assert align(teacher, student) == [(3, 1, 1), (4, 2, 2), (9, 3, 5)]
    # one merges what the other splits: "New York" as one token against "New" + " York"
    assert align(boundaries([(0, 8)], 8), boundaries([(0, 3), (3, 8)], 8)) == [(8, 0, 1)]
    # "Hello  world": "▁▁" (5, 7) against "Ġ" (5, 6) + "Ġworld" (6, 12)
    t = boundaries([(0, 0), (0, 5), (5, 7), (7, 12)], 12)
    assert align(t, boundaries([(0, 5), (5, 6), (6, 12)], 12)) == [(5, 1, 0), (12, 3, 2)]


def test_decoded_boundaries_match_offsets_on_real_tokenizers():
    for tok in (bpe_tokenizer(CORPUS), bpe_tokenizer(STUDENT_CORPUS, 300)):
        for text in TEXTS:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            from_offsets = boundaries(enc["offset_mapping"], len(text))
            assert decoded_boundaries(enc["input_ids"], tok.decode, text) == from_offsets
            assert len(text) in from_offsets


def test_every_aligned_pair_covers_the_same_text_on_both_sides():
    teacher, student = _teacher(), _student()
    s_ids, _, t_ids, _, pairs, _ = encode_texts(teacher, student, TEXTS)
    dec_t = lambda ids: teacher.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    dec_s = lambda ids: student.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    seen = 0
    for n, text in enumerate(TEXTS):
        for b, i, j in pairs[n].tolist():
            if b < 0:
                continue
            assert dec_t(t_ids[n, : i + 1].tolist()) == text[:b]
            assert dec_s(s_ids[n, : j + 1].tolist()) == text[:b]
            seen += 1
    # the tokenizers differ: fewer common boundaries than student tokens, but many
    assert 0.3 * s_ids.ne(student.tokenizer.pad_token_id).sum() < seen < s_ids.numel()


# -- the losses against hand computations -------------------------------------------------


def test_uld_distance_against_a_hand_computation():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.6, 0.1, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    # sorted and zero-padded: |.5-.6|+|.3-.2|+|.2-.1|+|0-.1| = 0.4;  .35+.05+.05+.25 = 0.7
    want = (0.4 + 0.7) / 2
    assert uld_distance(p.log(), q.log()).item() == pytest.approx(want, abs=1e-6)
    assert uld_distance(q.log(), p.log()).item() == pytest.approx(want, abs=1e-6)  # V_s > V_t
    # top 2 only: |.5-.6|+|.3-.2| and tails (.2, .2) → 0.2;  .35+.05 and tails (.2, .5) → 0.7
    assert uld_distance(p.log(), q.log(), top_k=2).item() == pytest.approx(0.45, abs=1e-6)
    # the temperature softens both sides before sorting
    z_s, z_t = torch.randn(3, 5), torch.randn(3, 8)
    assert torch.allclose(uld_distance(z_s, z_t, 2.0), uld_distance(z_s / 2, z_t / 2))


def test_uld_is_zero_for_permuted_distributions():
    """ULD compares sorted probabilities only: a teacher that puts the student's probabilities on
    other tokens (here also with extra zero-probability tokens) is at distance zero."""
    z = torch.randn(4, 7)
    permuted = z[:, torch.randperm(7, generator=torch.Generator().manual_seed(0))]
    padded = torch.cat([permuted, torch.full((4, 5), -1e9)], -1)
    assert uld_distance(z, permuted).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_distance(z, padded).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_distance(z, torch.randn(4, 12)).item() > 0.05


def test_shared_kl_against_a_hand_computation():
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]])  # teacher, 4 tokens
    p = torch.tensor([[0.5, 0.25, 0.25]])  # student, 3 tokens
    shared = (torch.tensor([0, 2]), torch.tensor([1, 2]))  # teacher 0 ↔ student 1, 2 ↔ 2
    # renormalised: q̃ = (2/3, 1/3), p̃ = (1/2, 1/2)
    want = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)
    assert shared_kl(p.log(), q.log(), shared).item() == pytest.approx(want, abs=1e-6)
    assert shared_kl(p.log(), q.log(), shared, 2.0).item() > 0


def test_shared_vocab_maps_identical_strings_once():
    teacher = ["", "a", " the", "\ufffd", "b", "a"]
    student = ["a", "x", " the", "", "b", "\ufffd"]
    t, s = shared_vocab(teacher, student)
    assert t.tolist() == [1, 2, 4] and s.tolist() == [0, 2, 4]


# -- refusals and the teacher's two paths ----------------------------------------------------


def test_same_vocabulary_or_nothing_aligned_is_a_one_line_config_error():
    same = LocalModel(*tiny_lm("llama", 1), name="student")
    with pytest.raises(ConfigError, match=r"same vocabulary.*lm_student") as e:
        uld(_teacher(), same, TEXTS)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"no position .* aligns"):
        uld(_teacher(), _student(), ["", ""])
    with pytest.raises(ConfigError, match="LocalModel"):
        uld(_teacher().model, _student(), TEXTS)


def test_a_scores_handle_gives_the_rows_of_the_model_in_memory():
    teacher, student = _teacher(), _student()
    batch = encode_texts(teacher, student, TEXTS)
    rows = teacher_rows(teacher, TEXTS, batch).log_softmax(-1)
    scores = narrow(teacher, Access.SCORES)
    by_text = teacher_rows(scores, TEXTS, encode_texts(scores, student, TEXTS))
    assert rows.shape == by_text.shape and rows.shape[0] > 20
    assert torch.allclose(rows, by_text, atol=1e-5)


# -- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def taught() -> LocalModel:
    """A tiny Gemma 3 teacher trained a little on the texts, so that it has something to teach."""
    teacher = _teacher()
    ids = [teacher.tokenizer(t, return_tensors="pt")["input_ids"] for t in TEXTS]
    opt = torch.optim.AdamW(teacher.model.parameters(), lr=1e-2)
    teacher.model.train()
    for _ in range(40):
        for x in ids:
            teacher.model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher.model.eval().requires_grad_(False)
    return teacher


def _distance(teacher: LocalModel, student: LocalModel) -> float:
    """Mean shared-vocabulary KL from the teacher to the student at the aligned positions."""
    batch = encode_texts(teacher, student, TEXTS)
    s_ids, s_mask, _, _, pairs, _ = batch
    rows, cols = (pairs[..., 0] >= 0).nonzero(as_tuple=True)
    with torch.no_grad():
        logits = student.model(input_ids=s_ids, attention_mask=s_mask).logits
        s_rows = logits[rows, pairs[rows, cols, 2]]
        return shared_kl(s_rows, teacher_rows(teacher, TEXTS, batch),
                         check_vocabularies(teacher, student)).item()  # fmt: skip


def test_the_registered_method_trains_and_the_kd_terms_pull_towards_the_teacher(taught):
    t_cfg = TrainConfig(steps=30, lr=1e-2, seed=0, progress=False)
    before = _distance(taught, _student())
    student = _student()  # the teacher in memory: one pass per batch (same rows as SCORES)
    result = registry.run("distill/uld", taught, student, TEXTS, cfg=ULDConfig(batch_size=2),
                          train_cfg=t_cfg)  # fmt: skip
    losses = result.history.losses
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert result.info["aligned"] > 20 and result.info["shared"] > 100
    lm_only = _student()
    uld(taught, lm_only, TEXTS, ULDConfig(batch_size=2, uld_weight=0, shared_kl_weight=0),
        train_cfg=t_cfg)  # fmt: skip
    with_kd, without = _distance(taught, student), _distance(taught, lm_only)
    assert with_kd < 0.5 * before and with_kd < 0.8 * without


def test_text_blocks_cut_at_closing_boundaries_and_layer_dropped_keeps_the_tokenizer():
    tok = bpe_tokenizer(STUDENT_CORPUS, 300)
    blocks = text_blocks(tok, TEXTS, 8)
    assert len(blocks) >= 8 and text_blocks(tok, TEXTS, 8, max_blocks=3) == blocks[:3]
    assert TEXTS[0].startswith("".join(blocks[:2]))
    for b in blocks:
        assert 8 <= len(tok(b, add_special_tokens=False)["input_ids"]) <= 10
    teacher = LocalModel(*tiny_lm("llama", 0), name="m")
    student = layer_dropped(teacher, every=2)
    assert num_layers(student.model) == 1 and student.tokenizer is teacher.tokenizer
