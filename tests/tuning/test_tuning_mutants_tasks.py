"""The text-classification tasks every tuning figure rests on (`lfm.tuning.tasks`).

Pins, with values worked out by hand on tiny inputs: the BBC verbaliser (label words, the
1200-character cut), a verbaliser's dict form, `TextClassification` / `Instructions` / `Corpus` /
`Documents` (inputs kept as immutable tuples, every bad input a one-line `ConfigError` saying
what is wrong), `class_scores` (whole-word scores for multi-token label words, and pair by pair
on a handle that sends only its top-k log-probabilities), `accuracy`, `few_shot` (k per class,
seeded by its own generator), `held_out` (the first rows of each class) and `labelled_dataset`
(its name, its default of one shot, the holdout forms it takes and refuses).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import pytest
import torch

from lfm.access import Access
from lfm.assets.datasets import TextDataset
from lfm.errors import AccessError, ConfigError
from lfm.tuning.tasks import (
    BBC_TEMPLATE,
    DATA_TEMPLATE,
    Corpus,
    Documents,
    Instructions,
    TextClassification,
    TooFewExamples,
    Verbalizer,
    accuracy,
    bbc_verbalizer,
    class_scores,
    few_shot,
    held_out,
    labelled_dataset,
    labelled_verbalizer,
)

# ------------------------------------------------------------------------------------------------
# Verbalisers


def test_bbc_verbalizer_maps_classes_to_label_words_and_cuts_articles_at_1200_chars():
    v = bbc_verbalizer(("sports", "tech", "business"))
    assert v == Verbalizer(BBC_TEMPLATE, ("sport", "technology", "business"), 1200)
    assert v.prompt("a" * 1300) == "Article: " + "a" * 1200 + "\nTopic:"
    assert bbc_verbalizer(("tech",), max_chars=3).prompt(" abcdef") == "Article: ab\nTopic:"


def test_verbalizer_dict_form_has_its_three_fields_and_reads_back():
    v = Verbalizer("Q: {text}\nA:", ("yes", "no"), 40)
    d = v.to_dict()
    assert d == {"template": "Q: {text}\nA:", "label_words": ["yes", "no"], "max_chars": 40}
    assert Verbalizer.from_dict(d) == v


def test_labelled_verbalizer_uses_the_label_strings_under_the_data_template():
    v = labelled_verbalizer(("neg", "pos"))
    assert v == Verbalizer(DATA_TEMPLATE, ("neg", "pos"), 1200)
    assert v.prompt("a" * 1300) == "Text: " + "a" * 1200 + "\nLabel:"
    assert labelled_verbalizer(("neg", "pos"), max_chars=5).prompt("abcdefgh") == (
        "Text: abcde\nLabel:"
    )


# ------------------------------------------------------------------------------------------------
# TextClassification


def test_text_classification_keeps_texts_as_a_tuple_and_labels_as_int64():
    texts = ["a", "b", "c"]
    task = TextClassification(texts, torch.tensor([2, 0, 1], dtype=torch.int32), n_classes=3)
    texts.append("d")  # the task is a snapshot of its inputs
    assert task.texts == ("a", "b", "c") and isinstance(task.texts, tuple)
    assert task.labels.dtype == torch.long and task.labels.tolist() == [2, 0, 1]
    from_lists = TextClassification(iter(["x", "y"]), [1, 1], n_classes=2)  # one class present
    assert from_lists.texts == ("x", "y") and from_lists.labels.dtype == torch.long
    assert from_lists.classes == 2


def test_text_classification_takes_a_verbalizer_or_n_classes():
    verb = Verbalizer("T: {text} ->", ("good", "bad", "meh"))
    with_verb = TextClassification(["x", "y"], [0, 2], verbalizer=verb)
    assert with_verb.classes == 3 and with_verb.n_classes is None
    with_n = TextClassification(["x"], [3], n_classes=4)
    assert with_n.classes == 4 and with_n.verbalizer is None
    assert TextClassification([], [], n_classes=2).classes == 2  # an empty task is allowed
    with pytest.raises(
        ConfigError, match=r"^a TextClassification needs a verbalizer \(label words\) or n_classes$"
    ):
        TextClassification(["x"], [0])


def test_text_classification_refuses_mismatched_lengths_and_labels_out_of_range():
    with pytest.raises(ConfigError, match=r"^3 texts but 2 labels$"):
        TextClassification(["a", "b", "c"], [0, 1], n_classes=2)
    with pytest.raises(ConfigError, match=r"^labels must lie in range\(2\)$"):
        TextClassification(["a", "b"], [0, 2], n_classes=2)  # the label equal to the count
    with pytest.raises(ConfigError, match=r"^labels must lie in range\(2\)$"):
        TextClassification(["a", "b"], [-1, 1], n_classes=2)
    ok = TextClassification(["a", "b", "c"], [0, 1, 0], n_classes=2)  # 0 and classes - 1 fit
    assert ok.labels.tolist() == [0, 1, 0]


def test_text_classification_prompts_go_through_the_template_only_with_a_verbalizer():
    verb = Verbalizer("T: {text} ->", ("good", "bad"), max_chars=4)
    task = TextClassification(["  hello", "ok"], [0, 1], verbalizer=verb)
    assert task.prompts() == ["T: he ->", "T: ok ->"]  # cut to 4 chars, then stripped
    plain = TextClassification(("  hello", "ok"), [0, 1], n_classes=2)
    assert plain.prompts() == ["  hello", "ok"] and isinstance(plain.prompts(), list)


def test_needs_verbalizer_gives_the_verbalizer_or_says_what_needs_one():
    verb = Verbalizer("{text} ->", ("a", "b"))
    assert TextClassification(["x"], [1], verbalizer=verb).needs_verbalizer("MeZO") is verb
    with pytest.raises(
        ConfigError, match=r"^MeZO classifies through label words; give the task a verbalizer$"
    ):
        TextClassification(["x"], [1], n_classes=2).needs_verbalizer("MeZO")


# ------------------------------------------------------------------------------------------------
# Instructions, Corpus, Documents


def test_instructions_copy_their_rows_into_a_tuple_of_plain_dicts():
    row = {"prompt": "2+2?", "response": "4"}
    task = Instructions([row, MappingProxyType({"prompt": "hi", "response": "hello"})])
    row["response"] = "5"  # the task keeps what it was given
    assert isinstance(task.rows, tuple)
    assert task.rows == ({"prompt": "2+2?", "response": "4"}, {"prompt": "hi", "response": "hello"})
    assert all(type(r) is dict for r in task.rows)


def test_instructions_name_the_first_five_rows_missing_a_field():
    good = {"prompt": "p", "response": "r"}
    with pytest.raises(
        ConfigError, match=r"^instruction rows \[1\] lack a 'prompt' or 'response' field$"
    ):
        Instructions([good, {"prompt": "p"}])
    bad = [{"text": str(i)} for i in range(7)]
    with pytest.raises(ConfigError, match=r"rows \[0, 1, 2, 3, 4\] lack"):
        Instructions(bad)  # one short line, not every index
    with pytest.raises(ConfigError, match=r"^no instruction rows$"):
        Instructions([])


def test_corpus_and_documents_keep_their_texts_as_tuples():
    texts = ["one", "two"]
    corpus, docs = Corpus(texts), Documents(iter(texts))
    texts.append("three")
    assert corpus.texts == ("one", "two") and isinstance(corpus.texts, tuple)
    assert docs.texts == ("one", "two") and isinstance(docs.texts, tuple)
    assert corpus == Corpus(("one", "two")) and hash(corpus) == hash(Corpus(("one", "two")))
    assert docs == Documents(("one", "two"), embeddings=torch.zeros(2, 3))  # not compared


def test_an_empty_corpus_or_document_set_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^an empty corpus gives an empty datastore$"):
        Corpus([])
    with pytest.raises(ConfigError, match=r"^REPLUG needs at least one document$"):
        Documents(())


# ------------------------------------------------------------------------------------------------
# class_scores and accuracy, on a toy scoring handle

VOCAB = ("big", "red", "cat", "dog", "sun", "sky")


class ToyLM:
    """A scoring handle whose next-token distribution favours the vocabulary words already in the
    context: logits = how often each word occurs in it. Words outside `VOCAB` are ignored."""

    access = Access.SCORES

    def encode(self, text: str) -> list[int]:
        return [VOCAB.index(w) for w in text.split()]

    def _row(self, context: str) -> torch.Tensor:
        counts = torch.tensor([float(context.split().count(w)) for w in VOCAB])
        return torch.log_softmax(counts, -1)

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._row(p) for p in prompts])

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        out = []
        for p, c in zip(prompts, continuations, strict=True):
            total, ctx = 0.0, p
            for w in c.split():
                total += float(self._row(ctx)[VOCAB.index(w)])
                ctx += " " + w
            out.append(total)
        return torch.tensor(out)


class TopKToyLM(ToyLM):
    """The toy served with only its top-2 log-probabilities per token: like an lfm server with
    `top_k`, it refuses the full next-token row."""

    top_k = 2

    def next_token_logprobs(self, prompts: Sequence[str]) -> torch.Tensor:
        raise AccessError("next_token_logprobs is the full next-token row; top 2 only")


TEXTS = ["big big cat", "red dog dog sky"]


def _pairwise(handle: ToyLM, verb: Verbalizer) -> torch.Tensor:
    return torch.stack(
        [handle.score([verb.prompt(t)] * len(verb.label_words),
                      [f" {w}" for w in verb.label_words]) for t in TEXTS]
    )  # fmt: skip


def test_class_scores_of_single_token_words_are_the_next_token_log_probs():
    verb = Verbalizer("{text} is", ("cat", "dog", "sun"))
    scores = class_scores(ToyLM(), TEXTS, verb)
    # "big big cat is": counts (2,0,1,0,0,0), Z = e^2 + e + 4
    z0 = torch.tensor(2.0).exp() + torch.tensor(1.0).exp() + 4
    assert torch.allclose(scores[0], torch.stack([1 - z0.log(), -z0.log(), -z0.log()]))
    assert torch.allclose(scores, _pairwise(ToyLM(), verb), atol=1e-6)


def test_class_scores_of_multi_token_words_score_the_whole_word():
    verb = Verbalizer("{text} is", ("big cat", "red dog"))  # every label word is two tokens
    h = ToyLM()
    scores = class_scores(h, TEXTS, verb)
    assert scores.shape == (2, 2)
    assert torch.allclose(scores, _pairwise(h, verb), atol=1e-6)
    first_token_only = h.next_token_logprobs([verb.prompt(t) for t in TEXTS])[:, [0, 1]]
    assert (scores < first_token_only - 0.1).all()  # the second token's log-prob is counted


def test_class_scores_on_a_top_k_handle_score_each_pair_on_its_own():
    verb = Verbalizer("{text} is", ("cat", "dog", "sky"))  # single tokens: no fast path here
    scores = class_scores(TopKToyLM(), TEXTS, verb)
    assert torch.allclose(scores, _pairwise(ToyLM(), verb), atol=1e-6)
    assert scores.argmax(-1).tolist() == [0, 1]


def test_class_scores_name_what_needs_scores_access():
    class TextOnly(ToyLM):
        access = Access.TEXT

    with pytest.raises(
        AccessError, match=r"^prompt-based classification needs SCORES access, but the handle"
    ):
        class_scores(TextOnly(), ["x"], Verbalizer("{text}", ("cat",)))


def test_accuracy_is_the_fraction_of_rows_whose_best_score_is_the_label():
    scores = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # 1
            [0.9, 0.0, 0.1],  # 0
            [0.2, 0.3, 0.5],  # 2
            [0.6, 0.3, 0.1],  # 0
            [0.0, 0.4, 0.6],  # 2
        ]
    )
    assert accuracy(scores, torch.tensor([1, 0, 1, 2, 2])) == pytest.approx(3 / 5)
    assert accuracy(scores, torch.tensor([1, 0, 2, 0, 2])) == 1.0
    assert accuracy(scores[:2], torch.tensor([0, 1])) == 0.0


# ------------------------------------------------------------------------------------------------
# few_shot and held_out


def _dataset(y_train: list[int], y_test: list[int], n_classes: int = 3) -> TextDataset:
    return TextDataset(
        "toy",
        tuple(f"train{i}" for i in range(len(y_train))),
        torch.tensor(y_train),
        tuple(f"test{i}" for i in range(len(y_test))),
        torch.tensor(y_test),
        tuple("abcdefg"[:n_classes]),
    )


def test_few_shot_draws_k_of_each_class_seeded_by_its_own_generator():
    data = _dataset([i % 3 for i in range(24)], [0])  # 8 training rows per class
    torch.manual_seed(0)
    texts, y = few_shot(data, 3, seed=7)
    torch.manual_seed(123)  # the draw does not depend on the global generator ...
    state = torch.get_rng_state()
    again = few_shot(data, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor move it
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(set(texts)) == 9
    assert all(
        int(t.removeprefix("train")) % 3 == c for t, c in zip(texts, y.tolist(), strict=True)
    )
    assert again[0] == texts and torch.equal(again[1], y)
    assert any(few_shot(data, 3, seed=s)[0] != texts for s in (8, 9))  # another seed, another draw


def test_few_shot_of_a_whole_class_takes_all_of_it_and_one_more_is_an_error():
    data = _dataset([0, 1, 0, 1, 1], [0], n_classes=2)  # class 'a' has 2 training rows
    texts, y = few_shot(data, 2, seed=0)
    assert sorted(texts[:2]) == ["train0", "train2"] and y.tolist() == [0, 0, 1, 1]
    with pytest.raises(
        TooFewExamples, match="class 'a' has only 2 training examples, fewer than k=3"
    ):
        few_shot(data, 3, seed=0)


def test_held_out_takes_the_first_rows_of_each_class_or_all_for_zero():
    data = _dataset([0, 1, 2], [0, 1, 0, 2, 1, 0])
    texts, y = held_out(data, 2)
    assert texts == ["test0", "test2", "test1", "test4", "test3"] and y.tolist() == [0, 0, 1, 1, 2]
    texts, y = held_out(data, 1)
    assert texts == ["test0", "test1", "test3"] and y.tolist() == [0, 1, 2]
    texts, y = held_out(data, 0)
    assert texts == [f"test{i}" for i in range(6)] and y.tolist() == [0, 1, 0, 2, 1, 0]


# ------------------------------------------------------------------------------------------------
# labelled_dataset


def test_labelled_dataset_keeps_its_name_and_needs_one_shot_by_default():
    # two examples per class and half held out: one to train on, one held out
    ds = labelled_dataset("mine", ["a1", "b1", "a2", "b2"], ["a", "b", "a", "b"], 0.5)
    assert ds.name == "mine"
    assert ds.train_texts == ("a1", "b1") and ds.test_texts == ("a2", "b2")
    assert ds.y_train.tolist() == [0, 1] and ds.y_test.tolist() == [0, 1]


def test_labelled_dataset_sorts_its_classes_and_needs_two_of_them():
    ds = labelled_dataset("f", ["z1", "a1", "z2", "a2"], ["zebra", "ant", "zebra", "ant"], 0.5)
    assert ds.classes == ("ant", "zebra") and ds.y_train.tolist() == [1, 0]
    with pytest.raises(ConfigError, match=r"^f: 1 class \(pos\); need at least 2$"):
        labelled_dataset("f", ["p1", "p2", "p3"], ["pos"] * 3, 0.5)


def test_labelled_dataset_takes_exactly_shots_training_examples_per_class():
    texts = ["x0", "y0", "x1", "y1", "x2", "y2", "y3", "y4", "y5"]
    labels = [t[0] for t in texts]
    # every 3rd example of a class is held out: x keeps 2 to train on, y keeps 4
    ds = labelled_dataset("f", texts, labels, 0.34, shots=2)
    assert ds.train_texts == ("x0", "y0", "x1", "y1", "y3", "y4")
    assert ds.test_texts == ("x2", "y2", "y5")
    with pytest.raises(TooFewExamples, match=r"^f: class 'x' has 3 examples; it needs 3 to train"):
        labelled_dataset("f", texts, labels, 0.34, shots=3)


def test_labelled_dataset_refuses_texts_and_labels_of_different_lengths():
    with pytest.raises(ValueError):
        labelled_dataset("f", ["a1", "b1", "a2", "b2", "extra"], ["a", "b", "a", "b"], 0.5)
    with pytest.raises(ValueError):
        labelled_dataset("f", ["a1", "b1", "a2", "b2"], ["a", "b", "a", "b", "a"], 0.5)


def test_holdout_two_holds_out_every_second_example():
    texts = [f"{c}{i}" for i in range(4) for c in "pq"]
    labels = [c for _ in range(4) for c in "pq"]
    ds = labelled_dataset("f", texts, labels, 2)
    assert ds.test_texts == ("p1", "q1", "p3", "q3")
    assert ds.train_texts == ("p0", "q0", "p2", "q2")


@pytest.mark.parametrize("holdout", [0, 1, 1.0, -2, 2.5])
def test_holdout_outside_a_fraction_or_an_integer_of_two_or_more_is_refused(holdout):
    texts = [f"{c}{i}" for i in range(6) for c in "pq"]
    labels = [c for _ in range(6) for c in "pq"]
    with pytest.raises(ConfigError, match="holdout must be a fraction in"):
        labelled_dataset("f", texts, labels, holdout)
