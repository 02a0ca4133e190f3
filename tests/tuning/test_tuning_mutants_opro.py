"""OPRO / APE pinned where mutation testing found them loose: which class an answer names, the
answer length the target gets, the one-hot scores of generated labels, the saved instruction and
the record, the meta-prompt's exact text, and what each step's proposer is shown (how many
demonstrations and past instructions, cut and spaced as configured) under a seed of its own;
`opro` itself: its one-line refusals (data kind, no label words), its defaults (seed 0, no
progress lines) and the answer length it scores and keeps.
"""

from __future__ import annotations

import re

import pytest
import torch

from lfm.access import Access
from lfm.errors import ConfigError, LfmError
from lfm.tuning.opro import (
    InstructionPrompt,
    OproConfig,
    answer_label,
    generate_labels,
    load_instruction,
    meta_prompt,
    one_hot_scores,
    opro,
)
from lfm.tuning.proposer import OPRO_EXEMPLARS, OPRO_HEAD, OPRO_TAIL
from lfm.tuning.tasks import TextClassification, Verbalizer

LABELS = ("business", "politics", "sport")
VERB = Verbalizer("Text: {text} Label:", LABELS)
ITEMS = {"business": "shares and profit", "politics": "the vote and the party",
         "sport": "the match and the cup"}  # fmt: skip


def _task() -> TextClassification:
    texts = [f"{ITEMS[lab]} {i}" for i in range(2) for lab in LABELS]
    return TextClassification(texts, torch.tensor([0, 1, 2] * 2), VERB)


class Target:
    """A TEXT handle that names every text's label when the instruction says "topic", else none."""

    access = Access.TEXT

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        out = []
        for p in prompts:
            gold = next((lab for lab, item in ITEMS.items() if item in p), "")
            out.append(f" {gold}" if "topic" in p.split("Text:")[0].lower() else " not sure")
        return out


class Wordy:
    """A TEXT handle whose answer is " maybe it is sport", one word per token, cut to the tokens
    asked for."""

    access = Access.TEXT

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        return [" " + " ".join(["maybe", "it", "is", "sport"][:max_new_tokens]) for _ in prompts]


class Scripted:
    """A proposer that returns fixed outputs in order and records what it was sent."""

    access = Access.TEXT

    def __init__(self, outputs):
        self.outputs, self.sent, self.kwargs = list(outputs), [], []

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        self.sent.append(prompts[0])
        self.kwargs.append(kw)
        return [self.outputs.pop(0) for _ in prompts]


def _scored(meta: str) -> list[tuple[str, int]]:
    return [(t, int(s)) for t, s in re.findall(r"text:\n(.*)\nscore:\n(\d+)", meta)]


# ------------------------------------------------------------------------------------------------
# Which class an answer names.


def test_an_answer_whose_lowercase_is_longer_still_names_its_label():
    # "İ" lowercases to two characters: the label word then starts past len(answer)
    assert answer_label("İ" * 9 + " sport", ("business", "sport")) == 1
    assert answer_label("İİ SPORT", ("sport",)) == 0


def test_of_two_label_words_at_one_place_the_longer_wins_in_either_order():
    assert answer_label("sports news", ("sports", "sport")) == 0
    assert answer_label("sports news", ("sport", "sports")) == 1
    assert answer_label("x sports", ("sports", "business", "sport")) == 0


def test_of_equal_label_words_the_first_class_is_named():
    assert answer_label("Sport!", ("sport", "SPORT")) == 0
    assert answer_label("it is politics", ("business", "politics", "Politics")) == 1


# ------------------------------------------------------------------------------------------------
# Generated labels and their scores.


def test_the_target_answers_with_the_configured_number_of_tokens():
    texts = ["a", "b"]
    short = generate_labels(Wordy(), InstructionPrompt("", VERB, answer_tokens=2), texts)
    assert short.tolist() == [-1, -1]  # " maybe it": no label word yet
    full = generate_labels(Wordy(), InstructionPrompt("", VERB, answer_tokens=4), texts)
    assert full.tolist() == [2, 2]


def test_one_hot_scores_put_zero_on_the_named_class_and_minus_infinity_elsewhere():
    inf = float("-inf")
    s = one_hot_scores(torch.tensor([0, 2, -1, 1]), 3)
    want = torch.tensor([[0.0, inf, inf], [inf, inf, 0.0], [inf, inf, inf], [inf, 0.0, inf]])
    assert torch.equal(s, want)


def test_no_texts_give_no_labels_and_no_scores():
    pred = generate_labels(Wordy(), InstructionPrompt("", VERB), [])
    assert pred.dtype == torch.long and pred.shape == (0,)
    assert one_hot_scores(pred, 3).shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# The saved instruction and the record.


def test_an_instruction_prompt_keeps_its_answer_length_through_its_dict():
    p = InstructionPrompt("Name the topic.", VERB, answer_tokens=7)
    again = InstructionPrompt.from_dict(p.to_dict())
    assert again == p and again.answer_tokens == 7


def test_a_folder_without_an_instruction_is_one_clear_error(tmp_path):
    with pytest.raises(LfmError, match=r"cannot read an instruction from .*instruction\.json"):
        load_instruction(tmp_path)


def test_the_record_names_the_best_instruction_the_skips_and_every_score():
    script = ["[Name the topic.]", "[name the  topic.]", "[Answer half.]", "[NAME THE TOPIC.]"]
    cfg = OproConfig(steps=1, candidates=2, examples=1)
    res = opro(Target(), _task(), cfg, proposer=Scripted(script), seed=0)
    rec = res.record()
    assert rec["instruction"] == "Name the topic." and rec["best_score"] == 1.0
    assert rec["skipped"] == {"unusable": 0, "duplicate": 2}  # each repeat counted
    assert rec["stopped"] == "steps" and rec["verbalizer"] == VERB.to_dict()
    assert rec["instructions"] == [
        {"step": 0, "instruction": "", "score": 0.0},
        {"step": 0, "instruction": "Name the topic.", "score": 1.0},
        {"step": 1, "instruction": "Answer half.", "score": 0.0},
    ]


# ------------------------------------------------------------------------------------------------
# What the proposer is shown.


def test_the_meta_prompt_is_the_head_the_scored_texts_the_exemplars_and_the_tail():
    tried = [{"instruction": "Say it.", "score": 0.5, "order": 0},
             {"instruction": "Name the topic.", "score": 0.25, "order": 1}]  # fmt: skip
    shown = [("Text: a Label:", "sport"), ("Text: b Label:", "business")]
    want = (
        f"{OPRO_HEAD}\n\n"
        "text:\nName the topic.\nscore:\n25\n\ntext:\nSay it.\nscore:\n50\n\n"
        f"{OPRO_EXEMPLARS}\n\n"
        "input:\n<INS>\nText: a Label:\noutput:\nsport\n\n"
        "input:\n<INS>\nText: b Label:\noutput:\nbusiness\n\n"
        f"{OPRO_TAIL}"
    )
    assert meta_prompt(tried, shown, keep=5) == want
    bare = f"{OPRO_HEAD}\n\ntext:\nSay it.\nscore:\n50\n\n{OPRO_TAIL}"
    assert meta_prompt(tried, [], keep=1) == bare


def test_the_proposer_sees_the_configured_demos_exemplars_and_best_few():
    texts = [f"{w}  alpha\n  beta   gamma delta {i}" for i, w in enumerate(("one", "two", "six"))]
    data = TextClassification(texts * 2, torch.tensor([0, 1, 2] * 2), VERB)
    cut = {" ".join(t[:14].split()): LABELS[i] for i, t in enumerate(texts)}
    assert all(len(x) <= 14 and "  " not in x for x in cut)
    proposer = Scripted(["[First try.]", "[Second try.]"])
    cfg = OproConfig(steps=1, candidates=1, demos=2, examples=2, example_chars=14, keep=1)
    opro(Target(), data, cfg, proposer=proposer, seed=0)
    ape, step1 = proposer.sent
    demos = re.findall(r"Input: (.*)\nOutput: (.*)", ape)
    assert len(demos) == 2 and all(cut[x] == y for x, y in demos)
    shown = re.findall(r"input:\n<INS>\n(.*)\noutput:\n(.*)", step1)
    prompts = {(VERB.prompt(x), y) for x, y in cut.items()}
    assert len(shown) == 2 and all(pair in prompts for pair in shown)
    assert _scored(step1) == [("", 0)]  # both scored 0: only the shorter is kept


def test_every_step_samples_under_a_seed_of_its_own():
    steps = 15
    proposer = Scripted([f"[Instruction number {i}.]" for i in range(steps + 1)])
    opro(Target(), _task(), OproConfig(steps=steps, candidates=1), proposer=proposer, seed=0)
    seeds = [kw["seed"] for kw in proposer.kwargs]
    assert len(seeds) == steps + 1 and len(set(seeds)) == steps + 1


# ------------------------------------------------------------------------------------------------
# The call itself: its refusals, its defaults, and the answer length the search scores with.


def test_data_that_is_no_text_classification_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        opro(Target(), ["a", "b"], OproConfig(steps=0), proposer=Scripted([]))
    assert str(e.value) == "tuning/opro learns from a TextClassification, not a list"


def test_a_task_without_label_words_is_refused_naming_opro():
    task = TextClassification(["x", "y"], torch.tensor([0, 1]), n_classes=2)
    with pytest.raises(ConfigError) as e:
        opro(Target(), task, OproConfig(steps=0), proposer=Scripted([]))
    assert str(e.value) == "opro classifies through label words; give the task a verbalizer"


def test_the_default_seed_is_seed_zero_and_nothing_is_printed_by_default(capsys):
    cfg = OproConfig(steps=1, candidates=1)

    def seeds(**kw) -> list[int]:
        proposer = Scripted(["[Name the topic.]", "[Say it.]"])
        opro(Target(), _task(), cfg, proposer=proposer, **kw)
        return [k["seed"] for k in proposer.kwargs]

    default = seeds()
    assert capsys.readouterr().err == ""  # progress is off unless asked for
    assert default == seeds(seed=0) != seeds(seed=1)


class Late:
    """A TEXT handle whose answer names the gold label as its fourth word (one word per token)."""

    access = Access.TEXT

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        out = []
        for p in prompts:
            gold = next(lab for lab, item in ITEMS.items() if item in p)
            out.append(" " + " ".join(["so", "it", "is", gold][:max_new_tokens]))
        return out


def test_the_search_scores_and_keeps_the_configured_answer_length():
    cfg = OproConfig(steps=0, candidates=1, answer_tokens=4)
    res = opro(Late(), _task(), cfg, proposer=Scripted(["[Name the topic.]"]))
    assert res.start_score == 1.0 and res.best_score == 1.0  # 3 tokens would name nothing
    assert res.best.instruction == "" and res.best.answer_tokens == 4
    assert res.predict(Late(), _task().texts).tolist() == [0, 1, 2, 0, 1, 2]
