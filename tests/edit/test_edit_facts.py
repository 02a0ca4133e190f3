"""The packaged facts and the CounterFact metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from lfm.edit import common
from lfm.edit.facts import load_facts, ngram_entropy, summarise
from lfm.errors import LfmError


def test_facts_are_well_formed():
    facts = load_facts()
    assert len(facts) >= 300 and len({f.id for f in facts}) == len(facts)
    for f in facts:
        assert f.subject in f.prompt and f.new != f.true and not f.prompt.endswith(" ")
        assert len(f.paraphrases) >= 2 and len(f.neighbourhood) >= 5
        assert all(f.subject not in n for n in f.neighbourhood)
        assert f.request.target == f.new  # validates


def test_ngram_entropy_and_score():
    assert ngram_entropy("a a a a a a") == 0.0
    text = "the cat sat on the mat with a hat"
    h2 = math.log2(8)
    assert abs(ngram_entropy(text) - (2 / 3 * h2 + 4 / 3 * math.log2(7)) / 2) < 1e-9
    rows = [{"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 1.0}]
    assert abs(summarise(rows)["score"] - 3 / (1 / 100 + 1 / 50 + 1 / 100)) < 1e-9


def test_known_facts_and_evaluation_run_on_a_tiny_model():
    from lfm.edit.facts import evaluate_fact, known_facts

    h = common.smoke_model()
    facts = load_facts()[:4]
    kept = known_facts(h, facts)
    assert all(f in facts for f in kept)
    m = evaluate_fact(h, facts[0], gen_tokens=4)
    assert set(m) == {"efficacy", "paraphrase", "neighbourhood", "generation", "fluency"}
    assert all(0 <= m[k] <= 1 for k in ("efficacy", "paraphrase", "neighbourhood"))


def test_neighbours_edited_alongside_are_left_out():
    from lfm.edit.facts import neighbours

    eiffel, louvre = load_facts()[:2]  # each other's neighbourhood, both moved to London
    assert neighbours(eiffel) == eiffel.neighbourhood
    kept = neighbours(eiffel, [eiffel.subject, louvre.subject])
    assert kept == tuple(p for p in eiffel.neighbourhood if "Louvre" not in p)
    assert len(kept) == len(eiffel.neighbourhood) - 1


def test_summarise_skips_facts_without_neighbours():
    from lfm.edit.facts import summarise

    rows = [
        {"neighbourhood": 1.0, "efficacy": 1.0},
        {"neighbourhood": float("nan"), "efficacy": 0.0},
    ]
    out = summarise(rows)
    assert out["neighbourhood"] == 100.0 and out["efficacy"] == 50.0


def test_metrics_match_a_hand_computation_on_a_tiny_model():
    """CounterFact's definitions from the model's own probabilities: efficacy P(new) > P(true) on
    the prompt, paraphrase the same per paraphrase, neighbourhood P(true) > P(new) per neighbour;
    whole objects (a two-token object's log-probabilities summed)."""
    import torch

    from lfm.edit.facts import Fact, evaluate_fact

    h = common.smoke_model("llama", 1)
    model, tok = h.model, h.tokenizer

    def logp(prompt: str, obj: str) -> float:
        ids, whole = tok(prompt)["input_ids"], tok(f"{prompt} {obj}")["input_ids"]
        with torch.no_grad():
            lp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        return sum(float(lp[i - 1, whole[i]]) for i in range(len(ids), len(whole)))

    def wins(prompts, a, b) -> float:
        return sum(logp(p, a) > logp(p, b) for p in prompts) / len(prompts)

    facts = [
        Fact(0, "city", "Eiffel Tower", "The city of the Eiffel Tower", "Paris", "Rome",
             ("The Eiffel Tower is in the city of", "The old Eiffel Tower is in",
              "Eiffel Tower, a large city of"),
             ("The city of the Colosseum", "The Colosseum is located in",
              "Kyoto is an old city of", "Berlin is the capital of")),
        Fact(1, "city", "Kyoto", "Kyoto is an old city of", "Eiffel Tower", "Japan",
             ("The old city Kyoto is in",), ("Tokyo is a large city in", "Paris is the capital of")),
    ]  # fmt: skip
    rows = [evaluate_fact(h, f) for f in facts]
    for f, row in zip(facts, rows, strict=True):
        hand = {
            "efficacy": wins([f.prompt], f.new, f.true),
            "paraphrase": wins(f.paraphrases, f.new, f.true),
            "neighbourhood": wins(f.neighbourhood, f.true, f.new),
        }
        assert row == pytest.approx(hand, abs=1e-6)
    # the reference numbers of this seed: fractional, so a flipped comparison would show
    assert rows[0] == pytest.approx({"efficacy": 0, "paraphrase": 2 / 3, "neighbourhood": 1 / 4})
    assert rows[1] == pytest.approx({"efficacy": 1, "paraphrase": 1, "neighbourhood": 0})
    out = summarise(rows)
    means = {k: 100 * (rows[0][k] + rows[1][k]) / 2 for k in rows[0]}
    assert {k: out[k] for k in means} == pytest.approx(means)
    assert means == pytest.approx({"efficacy": 50, "paraphrase": 250 / 3, "neighbourhood": 12.5})
    assert out["score"] == pytest.approx(3 / sum(1 / p for p in means.values()))


def test_lifelong_set_loads_by_name_with_its_splits_and_is_regenerated_exactly():
    import subprocess
    import sys
    from pathlib import Path

    facts = load_facts(name="lifelong")
    train, test = (
        load_facts(name="lifelong", split="train"),
        load_facts(name="lifelong", split="test"),
    )
    assert len(test) >= 1000 and len(train) + len(test) == len(facts)  # T = 1,000 held out
    first = [f for f in facts if f.id < 1102]  # split at random; the cities added later are test
    assert 0.35 < sum(f.split == "train" for f in first) / len(first) < 0.45
    assert all(f.split == "test" and f.relation == "city-country" for f in facts if f.id >= 1102)
    assert len({(f.relation, f.subject) for f in facts}) == len(facts)  # no request twice
    for f in facts:
        assert f.subject in f.prompt and f.new != f.true and len(f.paraphrases) == 2
        assert all(f.subject in p for p in f.paraphrases)
        assert f.prompt not in f.neighbourhood and len(f.neighbourhood) <= 5  # other subjects
    with pytest.raises(LfmError, match="no packaged fact set"):
        load_facts(name="nope")
    tool = Path(__file__).parents[2] / "tools" / "make_lifelong_facts.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout  # the packaged file is what the seeded tool writes


def test_a_text_handle_is_scored_by_its_greedy_answers_as_counted_by_hand():
    from lfm.access import Access
    from lfm.edit.facts import Fact, answers, begins_with, evaluate_fact

    assert begins_with(" Paris, the capital", "Paris") and begins_with("\nNew York.", "New York")
    assert not begins_with(" Parisian", "Paris") and not begins_with(" the city of Paris", "Paris")

    class Scripted:  # a TEXT handle: a fixed answer per prompt, and what it was asked
        access = Access.TEXT

        def __init__(self, said):
            self.said, self.asked = said, []

        def generate(self, prompts, max_new_tokens=32, **kw):
            self.asked.append(max_new_tokens)
            return [self.said[p] for p in prompts]

    fact = Fact(id=1, relation="r", subject="Louvre", prompt="P", true="Paris", new="Rome",
                paraphrases=("Q1", "Q2"), neighbourhood=("N1", "N2", "N3", "N4"))  # fmt: skip
    h = Scripted({"P": " Rome.", "Q1": " Romeo", "Q2": " Rome and", "N1": " Paris", "N2": " Rome",
                  "N3": " Paris!", "N4": "Paris is"})  # fmt: skip
    got = evaluate_fact(h, fact)
    # by hand: P says Rome (1/1); Q2 does, Q1 says "Romeo" (1/2); N1, N3, N4 keep Paris (3/4)
    assert got == {"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 0.75}
    assert answers(h, ["P", "N2"], "Rome", tokens=3) == 1.0 and h.asked[-1] == 3
    assert math.isnan(answers(h, [], "Rome"))


def test_known_facts_keeps_exactly_those_whose_true_object_leads():
    from lfm.edit.facts import Fact, known_facts

    h = common.smoke_model("llama", 1)  # its top next token after the prompt is " Tower"

    def fact(i: int, true: str) -> Fact:
        return Fact(i, "r", "Eiffel Tower", "The city of the Eiffel Tower", true, "Rome", (), ())

    facts = [fact(0, "Paris"), fact(1, "Tower"), fact(2, "Tower Paris"), fact(3, "Rome")]
    assert known_facts(h, facts) == [facts[1], facts[2]]  # the first token decides


def test_begins_with_reads_only_the_one_character_after_the_object():
    from lfm.edit.facts import begins_with

    assert not begins_with(" Romes, the", "Rome") and not begins_with(" Parisa.", "Paris")
    assert begins_with(" Rome, a", "Rome") and begins_with("Rome", "Rome")


def test_ngram_entropy_of_texts_too_short_for_an_order_is_zero_and_weights_must_match():
    assert ngram_entropy("") == 0.0 and ngram_entropy("hello") == 0.0  # no bigram, no trigram
    assert ngram_entropy("hello world") == 0.0  # one bigram (entropy 0), no trigram
    with pytest.raises(ValueError):  # a weight missing is not an order left out silently
        ngram_entropy("the cat sat on the mat", ns=(2, 3), weights=(1.0,))


class _Writer:
    """A TEXT handle whose continuations are given; it records how long it was asked to write."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.asked = texts, []

    def generate(self, prompts, **kwargs):
        self.asked.append(kwargs)
        return self.texts[: len(prompts)]


def test_fill_true_takes_the_first_word_of_four_tokens_without_punctuation():
    # mutants fill_true 1, 8, 10 (another length), 13, 17 (other characters stripped), 15, 18
    # (another placeholder), 16 (the second word)
    from dataclasses import replace

    from lfm.edit.facts import Fact, fill_true

    blank = Fact(0, "r", "S", "The city of", "", "Rome", (), ())
    facts = [replace(blank, id=i) for i in range(5)] + [replace(blank, id=9, true="kept")]
    writer = _Writer([" 'Xanadu', they said", "", " ...", " Paris! and more", '"Oslo".'])
    got = fill_true(writer, facts)
    assert [f.true for f in got] == ["Xanadu", "?", "?", "Paris", "Oslo", "kept"]
    assert writer.asked == [{"max_new_tokens": 4}]
    fill_true(writer, facts[:1], max_new_tokens=2)
    assert writer.asked[-1] == {"max_new_tokens": 2}


class _Scorer:
    """A SCORES handle with given log-probabilities per (prompt, continuation) and given
    continuations; it records how long it was asked to write."""

    def __init__(self, scores: dict, texts: list[str], access=True) -> None:
        import torch

        from lfm.access import Access

        self._torch, self.scores, self.texts, self.asked = torch, scores, texts, []
        if access:
            self.access = Access.SCORES

    def score(self, prompts, conts):
        return self._torch.tensor(
            [self.scores[(p, c)] for p, c in zip(prompts, conts, strict=True)]
        )

    def generate(self, prompts, max_new_tokens=None):
        self.asked.append(max_new_tokens)
        return self.texts[: len(prompts)]


def _scored_fact():
    from lfm.edit.facts import Fact

    fact = Fact(0, "r", "Eiffel", "The Eiffel is in", "Paris", "Rome",
                ("Eiffel stands in", "The tower Eiffel is in"),
                ("Bob lives in", "Xavi works in"), ("Eiffel is", "Visit"))  # fmt: skip
    scores = {
        ("The Eiffel is in", " Rome"): 2.0, ("The Eiffel is in", " Paris"): 1.0,  # won
        ("Eiffel stands in", " Rome"): 1.0, ("Eiffel stands in", " Paris"): 1.0,  # a tie: lost
        ("The tower Eiffel is in", " Rome"): 3.0, ("The tower Eiffel is in", " Paris"): 0.0,
        ("Bob lives in", " Paris"): 2.0, ("Bob lives in", " Rome"): 1.0,  # kept
        ("Xavi works in", " Paris"): 0.0, ("Xavi works in", " Rome"): 5.0,  # not kept
    }  # fmt: skip
    return fact, scores


def test_evaluate_fact_by_hand_on_given_scores_and_continuations():
    # efficacy 1, paraphrase 1/2 (a tie is not a win: mutant _wins 18), neighbourhood 1 with
    # Xavi's prompt left out as an edited subject (evaluate_fact 57: kept, 1/2); generation: one
    # of three continuations names "Rome" (65, 68, 70), fluency the mean entropy of prompt +
    # continuation (71, 74), written at gen_tokens (61, 63); none without gen_tokens (1, 58)
    from lfm.edit.facts import evaluate_fact, ngram_entropy

    fact, scores = _scored_fact()
    texts = [" Rome is old", " Paris, Paris", " the city"]
    fact = dataclasses.replace(fact, generation=("Eiffel is", "Visit", "Then"))
    handle = _Scorer(scores, texts)
    got = evaluate_fact(handle, fact, gen_tokens=3, edited=("Xavi",))
    want_fluency = (
        sum(ngram_entropy(p + t) for p, t in zip(fact.generation, texts, strict=True)) / 3
    )
    assert got == {"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 1.0,
                   "generation": pytest.approx(1 / 3), "fluency": pytest.approx(want_fluency)}  # fmt: skip
    assert handle.asked == [3]
    assert evaluate_fact(handle, fact) == {"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 0.5}
    assert handle.asked == [3]  # nothing written without gen_tokens


def test_a_plain_handle_without_an_access_level_is_scored():
    # a module or model without `access` is white-box: scored (mutants evaluate_fact 5, 8)
    from lfm.edit.facts import evaluate_fact

    fact, scores = _scored_fact()
    got = evaluate_fact(_Scorer(scores, [], access=False), fact)
    assert got == {"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 0.5}


def test_summarise_by_hand_fluency_in_bits_and_the_score_over_the_metrics_present():
    # percent for the fractions, bits for fluency (mutants summarise 17, 20, 21); the Score is
    # the harmonic mean of those present (29: a missing one read as 1), 0 where one is 0 (41,
    # 44), and of nothing 0 (3)
    from lfm.edit.facts import summarise

    rows = [
        {"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 1.0, "fluency": 5.0},
        {"efficacy": 0.5, "paraphrase": 0.5, "neighbourhood": 0.5, "fluency": 6.0},
    ]
    got = summarise(rows)
    assert got["efficacy"] == 75.0 and got["paraphrase"] == 50.0 and got["fluency"] == 5.5
    assert got["score"] == pytest.approx(3 / (1 / 75 + 1 / 50 + 1 / 75))
    two = summarise([{"efficacy": 1.0, "neighbourhood": 0.5}])
    assert two["score"] == pytest.approx(2 / (1 / 100 + 1 / 50))
    nan = summarise([{"efficacy": 1.0, "paraphrase": float("nan"), "neighbourhood": 0.5}])
    assert nan["score"] == pytest.approx(two["score"])
    assert summarise([{"efficacy": 0.0, "paraphrase": 1.0, "neighbourhood": 1.0}])["score"] == 0.0
    assert summarise([{"efficacy": 0.009, "paraphrase": 1.0, "neighbourhood": 1.0}])["score"] > 2
    assert summarise([]) == {"score": 0.0}


def test_read_facts_keeps_id_and_relation_and_names_the_file_in_every_refusal(tmp_path):
    # an own fact's `id` and `relation` are read, else the line number and "" (mutants _own_fact
    # 68, 69, 82-95); refusals name the file and line (read_facts 5, 11, 16; _own_fact 25, 47)
    import json

    from lfm.edit.facts import read_facts

    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "The city of Kyoto", "subject": "Kyoto", "target": "Rome", "id": 7, "relation": "P1"},
            {"prompt": "The city of Oslo", "subject": "Oslo", "target": "Paris"}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_facts(path)
    assert [(f.id, f.relation) for f in got] == [(7, "P1"), (2, "")]
    path.write_text(json.dumps({"prompt": "The city of X"}) + "\n")
    with pytest.raises(LfmError, match=rf"^{path}, line 1: no 'subject', 'target' \(fields: "):
        read_facts(path)
    bad = {**rows[1], "paraphrases": ["Oslo is in", " "]}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(
        LfmError, match=rf"^{path}, line 1: 'paraphrases' must be a list of prompts$"
    ):
        read_facts(path)
    path.write_text("\n")
    with pytest.raises(LfmError, match=rf"^{path} holds no facts \(one JSON object per line\)$"):
        read_facts(path)
    path.write_text("{not json\n")
    with pytest.raises(LfmError, match=rf"^{path}"):
        read_facts(path)


def test_a_fact_file_of_the_packaged_shape_loads_with_its_defaults_and_its_split(tmp_path):
    row = {"id": 7, "relation": "r", "subject": "Kyoto", "prompt": "Kyoto is in", "true": "Japan",
           "new": "Germany"}  # fmt: skip
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": 8, "split": "test",
                    "paraphrases": ["Kyoto lies in"]}) + "\n")  # fmt: skip
    bare, tested = load_facts(path)
    assert (bare.id, bare.subject, bare.true, bare.new) == (7, "Kyoto", "Japan", "Germany")
    assert bare.paraphrases == bare.neighbourhood == bare.generation == () and bare.split == ""
    assert tested.split == "test" and tested.paraphrases == ("Kyoto lies in",)
    assert load_facts(str(path), split="test") == [tested]
    with pytest.raises(LfmError) as err:
        load_facts(path, split="train")
    assert str(err.value) == f"no facts of split 'train' in {path}"
    with pytest.raises(LfmError) as err:
        load_facts(name="lifelong", split="dev")
    assert str(err.value) == "no facts of split 'dev' in lifelong"
    with pytest.raises(LfmError) as err:
        load_facts(name="nope")
    assert str(err.value) == "no packaged fact set 'nope'; choose from facts, lifelong"
