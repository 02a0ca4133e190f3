"""Sequence-level KD and distilling step-by-step from TEXT-only teachers; also what each passes
on to the teacher (length, temperature) and to the training loop (the given config, its seed for
the batch order, the run), and their refusal of answers that do not match the inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import torch

from lfm.access import Access, LocalClassifier, LocalModel, narrow
from lfm.core.train import TrainConfig
from lfm.distill.distiller import as_terms, check_access
from lfm.distill.seqkd import (
    IGNORE,
    SeqKDConfig,
    StepByStepConfig,
    encode_pairs,
    seq_kd,
    sequence_nll,
    step_by_step,
    step_by_step_loss,
)
from lfm.errors import AccessError

from conftest import TinyMLP, make_lm

CFG = TrainConfig(steps=15, lr=2e-2, progress=False)


class ByteTokenizer:
    """UTF-8 bytes as token ids (0–255), EOS = 256, pad = 257: a tokenizer with no files."""

    vocab = 258
    eos_token, eos_token_id, pad_token_id, bos_token_id = "<eos>", 256, 257, None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ReverseTeacher:
    """A rule-based black box that answers each prompt with its reverse (TEXT access)."""

    access = Access.TEXT
    name = "reverse"

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **_: Any) -> list[str]:
        return [p[::-1][:max_new_tokens] for p in prompts]


def _student(seed: int = 1) -> LocalModel:
    model, tok = make_lm("llama", seed=seed)
    return LocalModel(model, tok, name="student")


def _nll(student: LocalModel, prompts, targets) -> float:
    tok = student.tokenizer
    ids, labels = encode_pairs(student.encode, list(zip(prompts, targets, strict=True)),
                               tok.eos_token_id, tok.pad_token_id)  # fmt: skip
    with torch.no_grad():
        return sequence_nll(student.model(input_ids=ids).logits, labels).item()


def test_encode_pairs_scores_only_targets_and_eos():
    ids, labels = encode_pairs(lambda s: [ord(c) for c in s], [("ab", "c"), ("a", "de")], 9, 0)
    assert ids.tolist() == [[97, 98, 99, 9], [97, 100, 101, 9]]
    assert labels.tolist() == [[IGNORE, IGNORE, 99, 9], [IGNORE, 100, 101, 9]]
    ids, labels = encode_pairs(lambda s: [ord(c) for c in s], [("ab", "c"), ("a", "")], 9, 0)
    assert ids[1].tolist() == [97, 9, 0, 0] and labels[1].tolist() == [IGNORE, 9, IGNORE, IGNORE]


def test_seq_kd_learns_a_text_handles_generations():
    teacher_model, tok = make_lm("llama", seed=0)
    teacher = narrow(LocalModel(teacher_model, tok), "text")  # TEXT is all it needs
    student = _student()
    prompts = ["The capital of Italy is", "Paris is the capital of", "Tokyo is a"]
    want = teacher.generate(prompts, max_new_tokens=6)
    cfg = SeqKDConfig(max_new_tokens=6, batch_size=3)
    before = _nll(student, prompts, want)
    res = seq_kd(teacher, student, prompts, cfg, train_cfg=CFG)
    targets, hist = res.info["targets"], res.history
    assert targets == want and res.student is student.model
    assert _nll(student, prompts, want) < 0.5 * before
    assert hist.losses[-1] < hist.losses[0]


def test_seq_kd_refuses_a_handle_without_an_access_level():
    class Anonymous:
        def generate(self, prompts, max_new_tokens=8):
            return list(prompts)

    with pytest.raises(AccessError, match="declares no access level"):
        seq_kd(Anonymous(), _student(), ["a"], SeqKDConfig(), train_cfg=CFG)


def test_feature_and_logit_losses_on_a_text_handle_are_refused():
    teacher = narrow(LocalModel(*make_lm("llama")), "text")
    with pytest.raises(AccessError, match=r"HIDDEN access.*only TEXT"):
        check_access(teacher, as_terms([("fitnets", 1.0, None, "fc1", "fc1")]))
    with pytest.raises(AccessError, match=r"SCORES access.*only TEXT"):
        check_access(teacher, as_terms([("kd", 1.0, None)]))
    labels = narrow(LocalClassifier(TinyMLP()), "text")
    with pytest.raises(AccessError, match=r"HIDDEN access.*only TEXT"):
        check_access(labels, as_terms([("at", 1.0, None, "fc1", "fc1")]))


def test_step_by_step_loss_is_label_plus_weighted_rationale():
    model, _ = make_lm("llama")
    g = torch.Generator().manual_seed(0)
    ids_a, ids_b = (
        torch.randint(3, 300, (2, 6), generator=g),
        torch.randint(3, 300, (2, 7), generator=g),
    )
    batch = (ids_a, ids_a, ids_b, ids_b)
    out = step_by_step_loss(model, batch, rationale_weight=0.25)
    assert out["loss"].item() == pytest.approx(
        out["label"].item() + 0.25 * out["rationale"].item(), rel=1e-6
    )
    with torch.no_grad():
        assert out["rationale"].item() == pytest.approx(
            sequence_nll(model(input_ids=ids_b).logits, ids_b).item(), rel=1e-6
        )


def test_step_by_step_trains_on_the_teachers_labels_and_rationales():
    from transformers import LlamaConfig

    from lfm.distill.lm import student_from_config

    tiny = LlamaConfig(vocab_size=ByteTokenizer.vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=128)  # fmt: skip
    student = LocalModel(student_from_config(tiny, 0), ByteTokenizer())
    cfg = StepByStepConfig(max_new_tokens=40, batch_size=2)
    res = step_by_step(ReverseTeacher(), student, ["2+2", "1+3"], cfg, train_cfg=CFG)
    labels, rationales, hist = res.info["labels"], res.info["rationales"], res.history
    ask = [cfg.rationale_prompt, cfg.label_prompt]
    assert rationales == [ask[0].format(input=x)[::-1].strip() for x in ["2+2", "1+3"]]
    assert labels == [ask[1].format(input=x)[::-1].strip() for x in ["2+2", "1+3"]]
    assert hist.losses[-1] < 0.5 * hist.losses[0]


def test_step_by_step_with_gold_labels_asks_the_teacher_for_rationales_only():
    class Counting(ReverseTeacher):
        asked: ClassVar[list[str]] = []

        def generate(self, prompts, max_new_tokens=32, **kw):
            self.asked += list(prompts)
            return super().generate(prompts, max_new_tokens, **kw)

    student = _student()
    cfg = StepByStepConfig(max_new_tokens=8, batch_size=2)
    res = step_by_step(Counting(), student, ["2+2", "1+3"], cfg, train_cfg=CFG.replace(steps=2),
                       labels=["4", "4"])  # fmt: skip
    assert res.info["labels"] == ["4", "4"]
    assert Counting.asked == [cfg.rationale_prompt.format(input=x) for x in ["2+2", "1+3"]]


# -- what mutation testing found untested: what each distiller passes on to the teacher (length,
# temperature), to the shared loop (the given TrainConfig, its seed for the batch order, the run
# that records metrics), refusals of generations/labels that do not match the inputs one to one,
# and that step-by-step returns the student's module.


class Asked(ReverseTeacher):
    """`ReverseTeacher` that records each call: (prompts, max_new_tokens, other keywords); it
    can drop its last answer or add one ("!") to every call."""

    def __init__(self, drop_last: bool = False, extra: bool = False):
        self.calls: list[tuple[list[str], int, dict]] = []
        self.drop_last, self.extra = drop_last, extra

    def generate(self, prompts, max_new_tokens=32, **kw):
        self.calls.append((list(prompts), max_new_tokens, kw))
        out = super().generate(prompts, max_new_tokens)
        return out[:-1] if self.drop_last else [*out, "!"] if self.extra else out


class FirstBytes(torch.nn.Module):
    """Wraps a byte-level LM and records the first byte of each sequence it reads, per call."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids, **kw):
        self.seen.append(bytes(input_ids[:, 0].tolist()).decode())
        return self.inner(input_ids=input_ids, **kw)


def _byte_student(record: bool = False) -> LocalModel:
    from transformers import LlamaConfig

    from lfm.distill.lm import student_from_config

    tiny = LlamaConfig(vocab_size=ByteTokenizer.vocab, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=128)  # fmt: skip
    model = student_from_config(tiny, 0)
    return LocalModel(FirstBytes(model) if record else model, ByteTokenizer())


def _order(seed: int, n: int, steps: int) -> list[int]:
    """Which of n items `shuffled_batches` gives first in each of `steps` batches of one."""
    import itertools

    from lfm.core.train import shuffled_batches

    batches = shuffled_batches(torch.arange(n), batch_size=1, seed=seed)
    return [int(b[0]) for b in itertools.islice(batches, steps)]


TWO = TrainConfig(steps=2, lr=1e-2, progress=False)


def test_seq_kd_asks_the_teacher_with_the_configs_length_and_temperature():
    teacher = Asked()
    cfg = SeqKDConfig(max_new_tokens=3, temperature=0.7, batch_size=2)
    res = seq_kd(teacher, _byte_student(), ["abcd", "xyz"], cfg, train_cfg=TWO)
    assert teacher.calls == [(["abcd", "xyz"], 3, {"temperature": 0.7})]
    assert res.info["targets"] == ["dcb", "zyx"]


def test_seq_kd_trains_with_the_given_train_config_and_records_into_the_given_run(tmp_path):
    from lfm.runs import Run

    run = Run("seqkd", root=tmp_path)
    res = seq_kd(Asked(), _byte_student(), ["ab", "cd"], SeqKDConfig(max_new_tokens=2),
                 train_cfg=TWO, run=run)  # fmt: skip
    assert len(res.history.losses) == 2  # TWO's 2 steps, not TrainConfig()'s 100
    assert run.manifest["metrics"]["step"] == 2
    assert run.manifest["metrics"]["loss"] == pytest.approx(res.history.losses[-1])


def test_seq_kd_shuffles_the_prompts_with_the_training_seed():
    # batches of one: the student reads the prompts (one byte each) in the seed's order
    assert _order(3, 4, 4) != _order(0, 4, 4)  # the seed matters for these four
    student = _byte_student(record=True)
    seq_kd(Asked(), student, list("abcd"), SeqKDConfig(max_new_tokens=2, batch_size=1),
           train_cfg=TWO.replace(steps=4, seed=3))  # fmt: skip
    assert student.model.seen == ["abcd"[i] for i in _order(3, 4, 4)]


def test_seq_kd_refuses_a_teacher_that_gives_fewer_generations_than_prompts():
    with pytest.raises(ValueError, match="shorter"):
        seq_kd(Asked(drop_last=True), _byte_student(), ["ab", "cd"], SeqKDConfig(max_new_tokens=2),
               train_cfg=TWO)  # fmt: skip


def test_step_by_step_asks_for_rationales_and_labels_with_the_configs_length():
    teacher = Asked()
    cfg = StepByStepConfig(max_new_tokens=3, batch_size=1)
    res = step_by_step(teacher, _byte_student(), ["2+2"], cfg, train_cfg=TWO)
    rationale = cfg.rationale_prompt.format(input="2+2")
    label = cfg.label_prompt.format(input="2+2")
    assert teacher.calls == [([rationale], 3, {}), ([label], 3, {})]
    # the reversed prompts cut to 3 characters: ":pets yb …" and ":rewsnA …"
    assert res.info["rationales"] == [":pe"] and res.info["labels"] == [":re"]


def test_step_by_step_trains_with_the_given_config_records_its_parts_and_returns_the_student(
    tmp_path,
):
    from lfm.runs import Run

    run, student = Run("sbs", root=tmp_path), _byte_student()
    res = step_by_step(Asked(), student, ["ab", "cd"], StepByStepConfig(max_new_tokens=2),
                       train_cfg=TWO, run=run)  # fmt: skip
    assert res.student is student.model
    assert len(res.history.losses) == 2
    metrics = run.manifest["metrics"]
    assert metrics["step"] == 2 and metrics["loss"] == pytest.approx(res.history.losses[-1])
    assert metrics["loss"] == pytest.approx(metrics["label"] + metrics["rationale"], rel=1e-5)


def test_step_by_step_shuffles_the_inputs_with_the_training_seed():
    # no prefixes: each task's sequence starts with the input's one byte; the label task is read
    # first in each step, then the rationale task of the same input
    student = _byte_student(record=True)
    cfg = StepByStepConfig(max_new_tokens=2, batch_size=1, label_prefix="", rationale_prefix="")
    step_by_step(Asked(), student, list("abcd"), cfg, train_cfg=TWO.replace(steps=4, seed=3))
    want = ["abcd"[i] for i in _order(3, 4, 4)]
    assert student.model.seen == [x for x in want for _ in range(2)]


def test_step_by_step_refuses_labels_or_rationales_that_do_not_match_the_inputs():
    cfg = StepByStepConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="longer"):
        step_by_step(Asked(), _byte_student(), ["ab"], cfg, train_cfg=TWO, labels=["x", "y"])
    with pytest.raises(ValueError, match="shorter"):
        step_by_step(Asked(), _byte_student(), ["ab", "cd"], cfg, train_cfg=TWO, labels=["x"])
    with pytest.raises(ValueError, match="longer"):  # the teacher adds a rationale
        step_by_step(Asked(extra=True), _byte_student(), ["ab"], cfg, train_cfg=TWO, labels=["x"])
    with pytest.raises(ValueError, match="shorter"):  # the teacher drops the last rationale
        step_by_step(Asked(drop_last=True), _byte_student(), ["ab", "cd"], cfg, train_cfg=TWO,
                     labels=["x", "y"])  # fmt: skip
