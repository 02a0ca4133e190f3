"""The packaged facts and the CounterFact metrics."""

from __future__ import annotations

import math

from lfm.edit import common
from lfm.edit.facts import load_facts, ngram_entropy, summarise


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
