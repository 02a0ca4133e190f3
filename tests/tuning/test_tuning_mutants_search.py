"""Prompt search (GrIPS) pinned where mutation testing found it untested.

A scripted SCORES handle (one token per label word; the gold label's logit set by the prompt)
makes the search's outcome known in advance: the score is accuracy plus 0.1 x the mean gold
log-probability (worked out by hand), the first example of each class becomes a demonstration
and is never scored, a rendered template is instruction, demonstrations, then the base template
(braces kept literal), the search keeps a candidate only when it beats the best and stops after
`patience` steps without gain, every kind of edit occurs (delete, swap, replace, add, demo) with
the applicable ones drawn evenly, the label-word phrases list the words, a proposer sees a
seeded, cut meta-prompt, and the saved record and a bad template folder say what they hold;
`prompt_search` itself: its one-line refusals, its defaults (seed 0, no progress lines), its
method name, a multi-sentence start split into phrases, demonstrations cut to `demo_chars`, the
proposer seeded by the search seed, a resume with other options refused, and no delete edit of
an empty instruction.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from lfm.access import Access
from lfm.core.runs import Run
from lfm.errors import ConfigError, LfmError
from lfm.tuning.prompt_search import (
    PROPOSAL_TOKENS,
    PROPOSER_DEMOS,
    Candidate,
    PromptSearchConfig,
    edit,
    label_phrases,
    load_template,
    objective,
    prompt_search,
    proposed_phrases,
    render,
)
from lfm.tuning.replay import ReplayLog
from lfm.tuning.tasks import TextClassification, Verbalizer, class_scores

WORDS = ("red", "green", "blue")
VERB = Verbalizer("Text: {text}\nLabel:", WORDS)
# the first of each class (indices 0, 1, 3) are the demonstrations; 2, 4, 5 are scored
LABELS = [1, 0, 0, 2, 1, 2]
TEXTS = [f"a {WORDS[y]} thing number {i}" for i, y in enumerate(LABELS)]


def _task() -> TextClassification:
    return TextClassification(TEXTS, torch.tensor(LABELS), VERB)


class Handle:
    """A SCORES handle: the gold label of the scored text (named in it) gets logit
    `gain(prompt)`, the others 0; it records every prompt it scores."""

    access = Access.SCORES
    top_k = None

    def __init__(self, gain=lambda prompt: 1.0):
        self.gain, self.prompts = gain, []

    def encode(self, text: str) -> list[int]:
        return [WORDS.index(text.strip())]

    def next_token_logprobs(self, prompts) -> torch.Tensor:
        self.prompts += prompts
        out = torch.zeros(len(prompts), len(WORDS))
        for r, p in enumerate(prompts):
            scored = p.rsplit("Text:", 1)[1]
            out[r, next(i for i, w in enumerate(WORDS) if f"a {w} " in scored)] = self.gain(p)
        return out


def _head_length(prompt: str) -> float:
    """Longer instructions score higher: the instruction's length in hundreds of characters."""
    return len(prompt.split("Text:", 1)[0]) / 100


# ------------------------------------------------------------------------------------------------
# The score, the split and the rendered template.


def test_the_objective_is_accuracy_plus_a_tenth_of_the_gold_log_probability():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    lse0 = math.log(math.exp(2) + math.exp(0) + math.exp(1))
    lse1 = math.log(math.exp(0) + math.exp(1) + math.exp(3))
    want = 0.5 + 0.1 * ((2 - lse0) + (1 - lse1)) / 2  # first right, second wrong
    assert objective(scores, y) == pytest.approx(want, abs=1e-6)


def test_the_first_example_of_each_class_is_a_demonstration_and_the_rest_is_scored():
    handle = Handle()
    cfg = PromptSearchConfig(instruction="Name it.", iterations=3, candidates=4, patience=3)
    res = prompt_search(handle, _task(), cfg, seed=0)
    assert (
        handle.prompts[0]
        == f"Name it.\n\nText: {TEXTS[0]}\nLabel: green\n\nText: {TEXTS[2]}\nLabel:"
    )
    parts = [p.split("Text: ")[1:] for p in handle.prompts]
    scored = {ps[-1].split("\n")[0] for ps in parts}
    shown = {d.split("\n")[0] for ps in parts for d in ps[:-1]}
    assert scored == {TEXTS[2], TEXTS[4], TEXTS[5]}
    assert shown == {TEXTS[0], TEXTS[1], TEXTS[3]}  # demo edits draw from the whole pool
    # every scored example right, its gold logit 1 and the others 0
    assert res.start_score == pytest.approx(1 + 0.1 * (1 - math.log(math.e + 2)), abs=1e-6)


def test_a_rendered_candidate_is_instruction_then_demonstrations_then_the_template():
    pool = [("x {a} y", 2), ("a long text here", 0)]
    c = Candidate(("Be brief.", "Say {it}."), (0, 1))
    v = render(c, VERB, pool, demo_chars=7)
    assert v.label_words == WORDS and v.max_chars == VERB.max_chars
    assert v.prompt("q {b}") == (
        "Be brief. Say {it}.\n\nText: x {a} y\nLabel: blue\n\nText: a long\nLabel: red\n\n"
        "Text: q {b}\nLabel:"
    )
    assert render(Candidate((), ()), VERB, pool, demo_chars=6).template == VERB.template
    assert render(Candidate((), (1,)), VERB, pool, 200).prompt("q") == (
        "Text: a long text here\nLabel: red\n\nText: q\nLabel:"
    )


def test_the_label_phrases_list_the_label_words():
    assert label_phrases(("yes",)) == ("Answer with one of: yes.", "The answer is yes.")
    assert label_phrases(WORDS) == (
        "Answer with one of: red, green, blue.",
        "The answer is red, green or blue.",
    )


# ------------------------------------------------------------------------------------------------
# The greedy search: acceptance, patience, the record.


def test_a_search_without_gain_keeps_the_start_and_stops_after_patience_steps():
    cfg = PromptSearchConfig(instruction="Name it.", iterations=10, candidates=3, patience=2)
    res = prompt_search(Handle(), _task(), cfg, seed=0)  # every prompt scores the same
    assert res.best == Candidate(("Name it.",), (0,))  # a tie does not replace the best
    assert res.stopped == "patience"
    assert res.history == [res.start_score] * 2
    assert res.evaluations == 1 + 2 * 3 and res.best_score == res.start_score


def test_a_search_that_gains_every_step_runs_all_iterations_and_keeps_the_best():
    handle = Handle(_head_length)
    cfg = PromptSearchConfig(instruction="Go.", iterations=4, candidates=5, patience=1)
    res = prompt_search(handle, _task(), cfg, seed=3)
    assert res.stopped == "iterations" and len(res.history) == 4
    assert all(b > a for a, b in zip([res.start_score, *res.history], res.history, strict=False))
    assert res.best_score == res.history[-1] > res.start_score
    assert res.evaluations == 1 + 4 * 5
    # the best score is the objective of the template kept
    again = objective(class_scores(handle, [TEXTS[2], TEXTS[4], TEXTS[5]], res.verbalizer),
                      torch.tensor([0, 1, 2]))  # fmt: skip
    assert again == pytest.approx(res.best_score, abs=1e-6)


def test_the_record_holds_the_prompt_found_and_how_the_search_ended(tmp_path):
    handle = Handle(_head_length)
    cfg = PromptSearchConfig(instruction="Go.", iterations=2, candidates=2, patience=1)
    res = prompt_search(handle, _task(), cfg, seed=1)
    rec = res.record()
    assert rec["start_score"] == res.start_score and rec["best_score"] == res.best_score
    assert rec["evaluations"] == res.evaluations and rec["stopped"] == res.stopped
    assert rec["phrases"] == list(res.best.phrases) and rec["demos"] == list(res.best.demos)
    assert rec["template"] == res.verbalizer.template
    assert rec["verbalizer"] == res.verbalizer.to_dict() and rec["pool"] == list(res.pool)
    res.save(tmp_path / "ps")
    saved = json.loads((tmp_path / "ps" / "result.json").read_text())
    assert saved["verbalizer"] == res.verbalizer.to_dict()
    assert load_template(tmp_path / "ps") == res.verbalizer


def test_a_folder_without_a_template_is_one_clear_error(tmp_path):
    with pytest.raises(LfmError, match="cannot read a prompt template from"):
        load_template(tmp_path)


# ------------------------------------------------------------------------------------------------
# The edits.

POOL = ("P1", "P2")


def _kind(before: Candidate, after: Candidate, n_pool: int) -> str:
    """Which edit turned `before` into `after` ("?" when none could have)."""
    b, a = list(before.phrases), list(after.phrases)
    if a == b and after.demos != before.demos:
        new = set(after.demos) - set(before.demos)
        ok = len(after.demos) == len(before.demos) == len(set(after.demos))
        return "demo" if ok and len(new) == 1 and new <= set(range(n_pool)) else "?"
    if after.demos != before.demos:
        return "?"
    if len(a) == len(b) - 1 and any(b[:i] + b[i + 1 :] == a for i in range(len(b))):
        return "delete"
    if len(a) == len(b) == 2 and a == b[::-1]:
        return "swap"
    if len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) <= 1:
        return "replace" if all(x == y or x in POOL for x, y in zip(a, b, strict=True)) else "?"
    if len(a) == len(b) + 1 and any(
        a[:i] + a[i + 1 :] == b and a[i] in POOL for i in range(len(a))
    ):
        return "add"
    return "?"


def test_every_kind_of_edit_occurs_and_each_is_what_it_says():
    c = Candidate(("a", "b"), (0,))
    kinds = Counter(_kind(c, edit(c, 3, random.Random(s), POOL), 3) for s in range(300))
    assert "?" not in kinds
    assert set(kinds) == {"delete", "swap", "replace", "add", "demo"}


def test_a_demo_edit_with_no_unused_demonstration_adds_a_phrase_instead():
    c = Candidate(("a",), (0, 1))
    outs = [edit(c, 2, random.Random(s), POOL) for s in range(200)]
    assert all(o.demos == (0, 1) for o in outs)
    assert Counter(_kind(c, o, 2) for o in outs).keys() == {"delete", "replace", "add"}


def test_applicable_edits_are_drawn_evenly_and_a_phrase_is_inserted_anywhere():
    c = Candidate(("a",), ())  # no demonstrations: add, replace, delete, and demo falls to add
    outs = [edit(c, 0, random.Random(s), ("P1",)) for s in range(4000)]
    kinds = Counter(_kind(c, o, 0) for o in outs)
    assert kinds["add"] / 4000 == pytest.approx(0.5, abs=0.04)
    assert kinds["replace"] / 4000 == pytest.approx(0.25, abs=0.04)
    assert kinds["delete"] / 4000 == pytest.approx(0.25, abs=0.04)
    adds = [o.phrases for o in outs if len(o.phrases) == 2]
    front = sum(p == ("P1", "a") for p in adds) / len(adds)
    assert front == pytest.approx(0.5, abs=0.05)


# ------------------------------------------------------------------------------------------------
# The proposer's phrases.


class Proposer:
    """A TEXT handle that answers every meta-prompt with `answer` and records what it got."""

    access = Access.TEXT

    def __init__(self, answer: str = "[Name the colour.]"):
        self.answer, self.calls = answer, []

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        self.calls.append((list(prompts), max_new_tokens, kw))
        return [self.answer for _ in prompts]


def test_a_proposer_writes_the_asked_number_of_phrases_from_cut_seeded_demonstrations():
    texts = [f"a {WORDS[i % 3]} object with a long description {i}" for i in range(12)]
    task = TextClassification(texts, torch.tensor([i % 3 for i in range(12)]), VERB)
    cfg = PromptSearchConfig(proposals=1, demo_chars=8)
    one = Proposer()
    assert proposed_phrases(one, task, cfg, seed=3) == ["Name the colour."]
    ((prompts, tokens, kw),) = one.calls
    assert len(prompts) == 1 and tokens == PROPOSAL_TOKENS and "seed" in kw
    inputs = [ln[len("Input: ") :] for ln in prompts[0].splitlines() if ln.startswith("Input: ")]
    assert len(inputs) == PROPOSER_DEMOS and all(len(x) <= 8 for x in inputs)
    two = Proposer()
    proposed_phrases(two, task, cfg, seed=3)
    assert two.calls == one.calls  # the same seed: the same demonstrations and sampling seed
    assert proposed_phrases(Proposer(), task, cfg.model_copy(update={"proposals": 0}), 3) == []


def test_a_proposer_on_a_task_without_label_words_is_one_clear_error():
    task = TextClassification(["x", "y"], torch.tensor([0, 1]), n_classes=2)
    with pytest.raises(ConfigError, match="prompt search classifies through label words"):
        proposed_phrases(Proposer(), task, PromptSearchConfig(), seed=0)


# ------------------------------------------------------------------------------------------------
# The call itself: its refusals, its defaults, the start, the cut demonstrations, the replay.


def test_data_that_is_no_text_classification_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        prompt_search(Handle(), ["a", "b"], PromptSearchConfig(iterations=1))
    assert str(e.value) == "tuning/prompt_search learns from a TextClassification, not a list"


def test_a_task_without_label_words_is_refused_naming_prompt_search():
    task = TextClassification(["x", "y"], torch.tensor([0, 1]), n_classes=2)
    with pytest.raises(ConfigError) as e:
        prompt_search(Handle(), task, PromptSearchConfig(iterations=1))
    says = "prompt search classifies through label words; give the task a verbalizer"
    assert str(e.value) == says


def test_the_default_seed_is_seed_zero_and_nothing_is_printed_unless_asked(capsys):
    cfg = PromptSearchConfig(instruction="Go.", iterations=3, candidates=2, patience=3)

    def run(**kw) -> tuple:
        res = prompt_search(Handle(_head_length), _task(), cfg, **kw)
        return res.best, res.history

    default = run()
    assert capsys.readouterr().err == ""  # progress is off by default, and when off
    assert default == run(seed=0) != run(seed=1)
    run(seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_the_result_is_recorded_as_prompt_search():
    res = prompt_search(Handle(), _task(), PromptSearchConfig(iterations=1, candidates=1))
    assert res.method == "prompt_search" and res.record()["method"] == "prompt_search"


def test_a_starting_instruction_of_two_sentences_starts_as_two_phrases():
    cfg = PromptSearchConfig(instruction="Name it. Be brief!  Go?", iterations=1, candidates=1)
    handle = Handle()
    res = prompt_search(handle, _task(), cfg, seed=0)  # no gain: the start is kept
    assert res.best.phrases == ("Name it.", "Be brief!", "Go?")  # each sentence keeps its stop
    assert handle.prompts[0].startswith("Name it. Be brief! Go?\n\n")  # the instruction scored


def test_demonstrations_are_cut_to_demo_chars_when_scored_and_in_the_template_found():
    handle = Handle()
    cfg = PromptSearchConfig(instruction="Name it.", iterations=1, candidates=1, demo_chars=5)
    res = prompt_search(handle, _task(), cfg, seed=0)
    assert handle.prompts[0] == f"Name it.\n\nText: a gre\nLabel: green\n\nText: {TEXTS[2]}\nLabel:"
    assert res.best == Candidate(("Name it.",), (0,))
    assert res.verbalizer.template == "Name it.\n\nText: a gre\nLabel: green\n\n" + VERB.template


def test_the_proposer_is_seeded_by_the_search_seed():
    def sent(seed: int) -> list:
        proposer = Proposer()
        cfg = PromptSearchConfig(iterations=1, candidates=1, proposals=1)
        res = prompt_search(Handle(), _task(), cfg, seed=seed, proposer=proposer)
        assert "Name the colour." in res.pool
        return proposer.calls

    assert sent(3) == sent(3) != sent(4)


def test_resuming_with_another_instruction_is_refused(tmp_path):
    cfg = PromptSearchConfig(instruction="Name it.", iterations=2, candidates=2, patience=2)
    first = prompt_search(Handle(), _task(), cfg, log=ReplayLog(Run("ps", path=tmp_path / "r")))
    again = prompt_search(Handle(), _task(), cfg, log=ReplayLog(Run("ps", path=tmp_path / "r")))
    assert again.best == first.best and again.score_calls == 0  # the same search: all replayed
    other = cfg.model_copy(update={"instruction": "Go."})
    refused = "evaluation 1 asks another candidate than the one it logged"
    with pytest.raises(LfmError, match=refused):
        prompt_search(Handle(), _task(), other, log=ReplayLog(Run("ps", path=tmp_path / "r")))


def test_an_edit_of_an_empty_instruction_never_deletes():
    c = Candidate((), (0,))
    outs = [edit(c, 3, random.Random(s), POOL) for s in range(200)]
    assert all(len(o.phrases) <= 1 for o in outs)
    assert {_kind(c, o, 3) for o in outs} == {"add", "demo"}
