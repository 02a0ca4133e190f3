"""IKE through narrowed (TEXT / SCORES) handles: retrieved copy, update and retain demonstrations
before the new fact; its patch as JSON."""

from __future__ import annotations

import importlib

import pytest
import torch

from lfm import registry
from lfm.access import Access, narrow
from lfm.edit import IkeConfig, MemoryPatch, Request, common, ike
from lfm.edit.facts import load_facts
from lfm.edit.memory import SMOKE_FACTS, Demo, char_embedder, demonstrations, quotas, select
from lfm.errors import AccessError, LfmError

memory = importlib.import_module("lfm.edit.memory")
REQ = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
CFG = IkeConfig(k=8, encoder="chars")
FACTS = load_facts()[:12]


def _kinds(editor, query: str) -> set[str]:
    return {d.kind for d, _ in editor.demonstrations(query)}


class Recorder:
    """A TEXT handle that records what it is asked and answers "Rome"."""

    access = Access.TEXT
    name = "recorder"

    def __init__(self):
        self.seen: list[str] = []

    def generate(self, prompts, max_new_tokens=32, **kw):
        self.seen += list(prompts)
        return [" Rome"] * len(prompts)


def test_three_kinds_ordered_by_similarity_and_the_new_fact_last():
    api = Recorder()
    editor = ike(api, REQ, CFG, embed=char_embedder, facts=FACTS).apply(api)
    demos = editor.demonstrations(REQ.prompt)
    assert [d.kind for d, _ in demos].count("copy") == 1  # 8 in 1:3:4
    assert _kinds(editor, REQ.prompt) == {"copy", "update", "retain"}
    sims = [s for _, s in demos]
    assert sims == sorted(sims) and len(demos) == 8  # the most similar nearest the query
    # no demonstration names the edited subject (the Eiffel Tower is other facts' neighbour)
    assert all("Eiffel" not in d.query and "Eiffel" not in d.fact for d, _ in demos)
    retain = [d for d, _ in demos if d.kind == "retain"]
    assert all(d.answer != f.new for d in retain for f in FACTS if d.fact.startswith(f.prompt))
    editor.generate([REQ.prompt], max_new_tokens=3)
    (seen,) = api.seen  # the model sees demonstrations, then the new fact, then the query
    head = f"New Fact: {REQ.prompt} Rome\nPrompt: {REQ.prompt}"
    assert seen.endswith(head) and seen.startswith(demos[0][0].text)
    assert seen.count("New Fact:") == 9


def test_selection_follows_similarity_within_each_kind():
    kinds = ["copy", "update", "update", "retain", "retain", "retain"]
    sims = torch.tensor([0.1, 0.9, 0.2, 0.5, 0.8, 0.3])
    assert quotas(4, (1, 1, 2)) == [1, 1, 2] and quotas(8, (1, 3, 4)) == [1, 3, 4]
    assert quotas(5, (1, 3, 4)) == [1, 2, 2]
    assert select(sims, kinds, 4, (1, 1, 2)) == [0, 3, 4, 1]  # 0.1 < 0.5 < 0.8 < 0.9


def test_without_demonstrations_the_kinds_are_missing(monkeypatch):
    """The demonstrations removed: the first test above would fail."""
    monkeypatch.setattr(memory, "select", lambda *a, **k: [])
    editor = ike(Recorder(), REQ, CFG, embed=char_embedder, facts=FACTS).apply(Recorder())
    assert _kinds(editor, REQ.prompt) == set()
    assert editor.context(REQ.prompt) == f"New Fact: {REQ.prompt} Rome\nPrompt: "


def test_demonstrations_are_built_from_the_fact_set():
    eiffel = FACTS[0]
    demos = demonstrations([eiffel])
    assert demos[0] == Demo("copy", f"{eiffel.prompt} {eiffel.new}", eiffel.prompt, eiffel.new)
    assert [d.kind for d in demos] == ["copy"] + ["update"] * len(eiffel.paraphrases) + [
        "retain"
    ] * len(eiffel.neighbourhood)
    assert {d.answer for d in demos if d.kind == "retain"} == {eiffel.true}
    assert demonstrations([eiffel], [eiffel.subject]) == []


def test_scores_go_through_the_context():
    h = common.smoke_model()
    scores = narrow(h, Access.SCORES)
    cfg = IkeConfig(k=4, encoder="chars")
    editor = ike(scores, REQ, cfg, facts=SMOKE_FACTS).apply(scores)
    assert editor.access is Access.SCORES and _kinds(editor, REQ.prompt) == set(memory.KINDS)
    with_ctx = editor.score([REQ.prompt], [" Rome"])
    assert with_ctx.allclose(h.score([editor.context(REQ.prompt) + REQ.prompt], [" Rome"]))
    assert not with_ctx.allclose(h.score([REQ.prompt], [" Rome"]))  # the model sees the fact
    nxt = editor.next_token_logprobs([REQ.prompt])
    assert nxt.allclose(h.next_token_logprobs([editor.context(REQ.prompt) + REQ.prompt]))
    assert ike(h, REQ).apply(h).access is Access.SCORES  # a white-box handle is wrapped at SCORES
    text = ike(narrow(h, "text"), REQ, cfg, facts=SMOKE_FACTS).apply(narrow(h, "text"))
    with pytest.raises(LfmError, match="only TEXT"):
        text.score([REQ.prompt], [" Rome"])
    with pytest.raises(LfmError, match="no edit requests"):
        ike(h, [])
    with pytest.raises(AccessError, match="not a model handle"):
        ike(object(), REQ)


def test_the_nearest_stored_fact_goes_before_a_query():
    other = Request("The Colosseum is located in the city of", "Colosseum", "Paris")
    editor = ike(Recorder(), [REQ, other], CFG, embed=char_embedder, facts=FACTS).apply(Recorder())
    assert editor.context(other.prompt).endswith(f"New Fact: {other.prompt} Paris\nPrompt: ")
    assert editor.context(REQ.prompt).endswith(f"New Fact: {REQ.prompt} Rome\nPrompt: ")


def test_memory_patch_saves_as_json_and_loads(tmp_path):
    h = common.smoke_model()
    cfg = IkeConfig(k=2, ratio=(0, 1, 1), encoder="chars")
    patch = registry.run("edit", "ike", narrow(h, "text"), [REQ], cfg=cfg)
    path = patch.save(tmp_path / "p.json")
    loaded = MemoryPatch.load(path)
    assert loaded == patch and loaded.config.ratio == (0, 1, 1)
    editor = loaded.apply(h)  # the packaged facts and the chars encoder, from the config
    assert _kinds(editor, REQ.prompt) == {"update", "retain"}
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(LfmError, match="not a lfm-edit-memory/1 file"):
        MemoryPatch.load(tmp_path / "x.json")


def test_cli_applies_and_evaluates_ike(tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    folder = tmp_path / "tiny"
    lm = common.smoke_model()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    (tmp_path / "c.yaml").write_text("k: 2\nencoder: chars\n")
    req = common.SMOKE_REQUEST
    args = ["--prompt", req.prompt, "--subject", req.subject, "--target", req.target]
    out, root = tmp_path / "p.json", str(tmp_path / "runs")
    res = CliRunner().invoke(app, ["apply", "--model", str(folder), "-m", "ike", *args,
                                   "--config", str(tmp_path / "c.yaml"), "-o", str(out), "--root",
                                   root])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "ike: 1 edit(s) on the context" in res.output
    assert MemoryPatch.load(out).config.k == 2
    res = CliRunner().invoke(
        app, ["eval", str(out), "--model", str(folder), "--max-new-tokens", "2"]
    )
    assert res.exit_code == 0, res.output
    editor = MemoryPatch.load(out).apply(lm)
    want = float(lm.score([editor.context(req.prompt) + req.prompt], [" Rome"]))
    assert abs(float(res.stdout.strip().splitlines()[-1].split("=")[-1]) - want) < 1e-3


# ---- `lfm edit eval --method ike`: the fact metrics without context and with IKE ----

OWN = [
    {"prompt": common.SMOKE_REQUEST.prompt, "subject": "Eiffel Tower", "target": "Rome",
     "true": "Paris", "paraphrases": ["The Eiffel Tower is a city"],
     "neighbourhood": ["The city of the Colosseum"]},
    {"prompt": "The capital of Japan", "subject": "Japan", "target": "Berlin", "true": "Tokyo",
     "paraphrases": ["Japan is the capital of"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smoke model saved as a folder, a facts file and an IKE config (chars encoder, k=4)."""
    import json

    root = tmp_path_factory.mktemp("ike")
    lm = common.smoke_model()
    lm.model.save_pretrained(root / "m")
    lm.tokenizer.save_pretrained(root / "m")
    (root / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in OWN))
    (root / "ike.yaml").write_text("k: 4\nencoder: chars\n")
    return root, lm


def _eval_ike(root, *extra: str):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    config = [] if "--config" in extra else ["--config", str(root / "ike.yaml")]
    args = ["eval", "--method", "ike", "--facts", str(root / "facts.jsonl"), *config, *extra]
    return CliRunner().invoke(app, args)


def _line(name: str, m: dict) -> str:
    keys = ("efficacy", "paraphrase", "neighbourhood", "score")
    return f"{name:<8} " + "  ".join(f"{k} {m[k]:.1f}" for k in keys)


def test_cli_eval_ike_prints_the_metrics_before_and_with_ike(tiny):
    from lfm.edit import recipes
    from lfm.edit.facts import read_facts

    root, lm = tiny
    res = _eval_ike(root, "--model", str(root / "m"))
    assert res.exit_code == 0, res.output
    # by hand, on a SCORES handle: the metrics alone, then through one memory patch of both facts
    api = narrow(lm, "scores")
    rows = read_facts(root / "facts.jsonl")
    patch = MemoryPatch([f.request for f in rows], IkeConfig(k=4, encoder="chars"))
    want = recipes.evaluate_facts(api, rows, patch)
    assert res.stdout.splitlines() == [
        "2 fact(s)", _line("before", want.before), _line("with IKE", want.after)
    ]  # fmt: skip
    assert "[lfm] loading the model" in res.stderr and "facts with ike" in res.stderr


class ScoreRecorder:
    """A SCORES handle that records the prompts it scores (every continuation scores 0)."""

    access = Access.SCORES
    name = "recorder"

    def __init__(self):
        self.seen: list[str] = []

    def score(self, prompts, continuations):
        self.seen += list(prompts)
        return torch.zeros(len(prompts))


def test_evaluate_ike_scores_without_context_then_with_the_nearest_fact(tiny):
    from lfm.edit import recipes

    root, _ = tiny
    api = ScoreRecorder()
    scores = recipes.evaluate_ike(api, root / "facts.jsonl", {"k": 2, "encoder": "chars"})
    assert scores.after is not None and [f.subject for f in scores.facts] == [
        "Eiffel Tower",
        "Japan",
    ]
    queries = [OWN[0]["prompt"], *OWN[0]["paraphrases"], *OWN[0]["neighbourhood"],
               OWN[1]["prompt"], *OWN[1]["paraphrases"]]  # fmt: skip
    half = len(api.seen) // 2
    assert half == 2 * len(queries)  # each query scored for the new and the true object
    assert sorted(set(api.seen[:half])) == sorted(queries)  # before: the bare queries
    for prompt in api.seen[half:]:  # with IKE: two demonstrations, the nearest fact, the query
        query = next(q for q in queries if prompt.endswith(q))
        fact = OWN[0] if query in queries[:3] else OWN[1]
        assert prompt.count("New Fact: ") == 3, prompt
        assert prompt.endswith(f"New Fact: {fact['prompt']} {fact['target']}\nPrompt: {query}")


def test_cli_eval_ike_through_a_served_model(tiny):
    from lfm.serve import Backend, ServeSettings, build_app
    from lfm.serve.thread import running

    root, lm = tiny
    # the tiny model reads 128 positions, and the server refuses longer texts: no demonstrations
    (root / "ike0.yaml").write_text("k: 0\nencoder: chars\n")
    config = ["--config", str(root / "ike0.yaml")]
    local = _eval_ike(root, "--model", str(root / "m"), *config)
    assert local.exit_code == 0, local.output
    app = build_app(Backend(lm, "scores"), ServeSettings(api_key="k"))
    with running(app) as url:
        served = _eval_ike(root, "--url", url, "--api-key", "k", *config)
        refused = _eval_ike(root, "--url", url, "--api-key", "wrong", *config)
    assert served.exit_code == 0, served.output
    assert served.stdout == local.stdout  # the same metrics through HTTP
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_cli_eval_ike_through_a_served_text_model_reads_its_answers(tiny):
    """A server at TEXT gives no scores: the CLI reads its level from the card and scores the
    facts by the greedy answers, as the local model narrowed to TEXT scores them."""
    from lfm.edit import recipes
    from lfm.edit.facts import read_facts
    from lfm.serve import Backend, ServeSettings, build_app
    from lfm.serve.thread import running

    root, lm = tiny
    (root / "ike0.yaml").write_text("k: 0\nencoder: chars\n")  # the tiny model's 128 positions
    app = build_app(Backend(lm, "text"), ServeSettings())
    with running(app) as url:
        served = _eval_ike(root, "--url", url, "--config", str(root / "ike0.yaml"))
    assert served.exit_code == 0, served.output
    rows = read_facts(root / "facts.jsonl")
    want = recipes.evaluate_ike(narrow(lm, "text"), rows, {"k": 0, "encoder": "chars"})
    assert served.stdout.splitlines() == [
        "2 fact(s)", _line("before", want.before), _line("with IKE", want.after)
    ]  # fmt: skip
    # TEXT reads answers, not probabilities: the SCORES reading of the same facts differs here
    scored = recipes.evaluate_ike(narrow(lm, "scores"), rows, {"k": 0, "encoder": "chars"})
    assert (want.before, want.after) != (scored.before, scored.after)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--method", "rome"], "`lfm edit apply -m rome`, then `lfm edit eval PATCH`"),
        (["--method", "ike"], "give --facts FILE and no patch"),
        (["--config", "IKE"], "--config is IKE's config here"),
        (["--method", "teleport"], "no method 'edit/teleport'"),
    ],
)
def test_cli_eval_method_errors_are_one_line(tiny, extra, says):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    root, _ = tiny
    extra = [str(root / "ike.yaml") if x == "IKE" else x for x in extra]
    res = CliRunner().invoke(app, ["eval", "--model", str(root / "m"), *extra])
    assert res.exit_code == 2 and says in res.output, res.output
    assert [x for x in res.output.splitlines() if x.strip()] == [res.output.strip()]


def test_a_served_model_takes_no_weight_patch(tiny, tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app
    from lfm.edit import ft_l
    from lfm.serve import Backend, ServeSettings, build_app
    from lfm.serve.thread import running

    _, lm = tiny
    ft_l(lm, common.SMOKE_REQUEST, {"steps": 1}).save(tmp_path / "p.safetensors")
    with running(build_app(Backend(lm, "scores"), ServeSettings())) as url:
        res = CliRunner().invoke(app, ["eval", str(tmp_path / "p.safetensors"), "--url", url])
    assert res.exit_code == 2 and "needs WEIGHTS access" in res.output, res.output
    assert "Traceback" not in res.output


def test_generation_goes_through_the_context_with_its_length_and_options():
    # the wrapped handle writes 32 tokens by default, or as many as asked, with the caller's
    # other options (mutants MemoryEditor.generate 1, 6, 7)
    class Writer(Recorder):
        def generate(self, prompts, max_new_tokens=32, **kw):
            self.asked = (max_new_tokens, kw)
            return super().generate(prompts, max_new_tokens, **kw)

    base = Writer()
    editor = ike(base, REQ, IkeConfig(k=4, encoder="chars"), facts=SMOKE_FACTS).apply(base)
    assert editor.generate([REQ.prompt]) == [" Rome"] and base.asked == (32, {})
    assert base.seen[-1] == editor.context(REQ.prompt) + REQ.prompt
    editor.generate([REQ.prompt], 5, do_sample=False)
    assert base.asked == (5, {"do_sample": False})


def test_quotas_take_the_largest_remainders_with_ties_to_the_earlier_kind():
    assert quotas(2, (1, 1, 1)) == [1, 1, 0]  # remainders 2/3 each: the first two kinds
    assert quotas(1, (1, 1, 1)) == [1, 0, 0]
    assert quotas(0, (1, 3, 4)) == [0, 0, 0]
    assert quotas(7, (0, 1, 1)) == [0, 4, 3]  # a kind of ratio 0 gets none
    assert quotas(32, (1, 3, 4)) == [4, 12, 16]
    assert quotas(3, (2, 1, 1)) == [1, 1, 1]  # 1.5, 0.75, 0.75: the two larger remainders
    assert quotas(2, (1, 1, 2)) == [1, 0, 1]  # 0.5, 0.5, 1: the tie goes to copy
    for k in range(12):
        for ratio in ((1, 3, 4), (5, 0, 2), (1, 1, 1), (2, 7, 3)):
            counts, exact = quotas(k, ratio), [k * r / sum(ratio) for r in ratio]
            assert sum(counts) == k and all(
                abs(c - e) < 1 for c, e in zip(counts, exact, strict=True)
            )


def test_selection_of_equal_similarities_keeps_the_pool_order():
    kinds = ["retain", "copy", "update", "retain"]
    sims = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert select(sims, kinds, 4, (1, 1, 2)) == [0, 1, 2, 3]
    assert select(sims, kinds, 3, (1, 1, 1)) == [0, 1, 2]  # one retain: the first of the two
    assert select(torch.tensor([0.7, 0.2]), ["update", "retain"], 3, (1, 1, 1)) == [1, 0]
    assert select(torch.tensor([0.9]), ["retain"], 4, (1, 1, 2)) == [0]  # a kind with none


def test_the_unit_embeddings_are_rows_of_length_one():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    got = memory._unit(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(memory._unit(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
    assert torch.equal(memory._unit(torch.tensor([[2.0, 0.0]])), torch.tensor([[1.0, 0.0]]))
    # short rows are stretched to length one too (the floor only keeps a zero row finite)
    assert torch.allclose(memory._unit(torch.tensor([[0.3, 0.4]])), torch.tensor([[0.6, 0.8]]))


def test_the_editor_keeps_no_demonstration_of_an_edited_subject_and_names_itself():
    other = Request("The Colosseum is located in the city of", "Colosseum", "Paris")
    api = Recorder()
    editor = ike(api, [REQ, other], CFG, embed=char_embedder, facts=FACTS).apply(api)
    assert editor.base is api and editor.cfg == CFG and editor.embed is char_embedder
    assert editor.facts == [REQ, other]
    assert editor.pool == demonstrations(FACTS, ["Eiffel Tower", "Colosseum"])
    assert len(editor.pool) < len(demonstrations(FACTS))  # some named the Eiffel Tower
    assert editor.name == "ike(recorder)" and editor.access is Access.TEXT
    assert repr(editor) == "MemoryEditor('ike(recorder)', 2 facts, access=TEXT)"
    with pytest.raises(LfmError) as e:
        editor.score([REQ.prompt], [" Rome"])
    assert str(e.value) == "ike(recorder): the wrapped handle gives only TEXT, not scores"
    with pytest.raises(LfmError) as e:
        editor.next_token_logprobs([REQ.prompt])
    assert str(e.value) == "ike(recorder): the wrapped handle gives only TEXT, not scores"

    class Nameless:
        access = Access.TEXT

        def generate(self, prompts, max_new_tokens=32, **kw):
            return [""] * len(prompts)

    assert ike(Nameless(), REQ, CFG, facts=FACTS).apply(Nameless()).name == "ike(model)"
    # an encoder given to `ike` is the one the patch's editor embeds with, whatever the config says
    seen: list[str] = []

    def embed(texts):
        seen.extend(texts)
        return char_embedder(texts)

    own = ike(api, [REQ, other], CFG, embed=embed, facts=FACTS).apply(api)
    assert own.embed is embed and own.fact_for(other.prompt) == other and seen


def test_one_demonstration_none_and_an_empty_pool():
    api = Recorder()
    one = ike(api, REQ, IkeConfig(k=1, encoder="chars"), facts=FACTS).apply(api)
    (demo,) = one.demonstrations(REQ.prompt)  # 1 of 1:3:4: the largest remainder, retain
    assert demo[0].kind == "retain"
    none = ike(api, REQ, IkeConfig(k=0, encoder="chars"), facts=FACTS).apply(api)
    assert none.demonstrations(REQ.prompt) == []
    empty = ike(api, REQ, CFG, facts=[]).apply(api)
    assert empty.pool == [] and empty.demonstrations(REQ.prompt) == []
    assert empty.context(REQ.prompt) == f"New Fact: {REQ.prompt} Rome\nPrompt: "


def test_the_context_is_the_demonstrations_then_the_new_fact():
    editor = ike(Recorder(), REQ, CFG, facts=FACTS).apply(Recorder())
    demos = editor.demonstrations(REQ.prompt)
    assert len(demos) == 8
    want = "".join(d.text for d, _ in demos) + f"New Fact: {REQ.prompt} Rome\nPrompt: "
    assert editor.context(REQ.prompt) == want


def test_a_patch_applies_with_its_encoder_and_fact_file(tmp_path):
    lines = [
        '{"id": 0, "relation": "city", "subject": "Colosseum", "prompt": "The city of the '
        'Colosseum", "true": "Rome", "new": "Paris", "paraphrases": ["The Colosseum sits in"],'
        ' "neighbourhood": ["The city of the Tower"]}'
    ]
    (tmp_path / "f.jsonl").write_text("\n".join(lines) + "\n")
    cfg = IkeConfig(k=3, encoder="chars", facts=str(tmp_path / "f.jsonl"))
    editor = MemoryPatch([REQ], cfg).apply(Recorder())
    assert editor.embed is char_embedder
    assert [d.query for d in editor.pool] == [
        "The city of the Colosseum", "The Colosseum sits in", "The city of the Tower"
    ]  # fmt: skip
    packaged = MemoryPatch([REQ], IkeConfig(encoder="chars")).apply(Recorder())
    assert packaged.pool == demonstrations(load_facts(), ["Eiffel Tower"])
    minilm = MemoryPatch([REQ]).apply(Recorder())  # the default: the paper's sentence encoder
    assert minilm.embed(["The city of the Colosseum"]).shape == (1, 384)  # not 128 characters


def test_a_patch_file_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(LfmError) as e:
        MemoryPatch.load(tmp_path / "none.json")
    assert str(e.value).startswith(f"cannot read {tmp_path / 'none.json'}: ")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LfmError) as e:
        MemoryPatch.load(tmp_path / "bad.json")
    assert str(e.value).startswith(f"cannot read {tmp_path / 'bad.json'}: ")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LfmError) as e:
        MemoryPatch.load(tmp_path / "list.json")
    want = f"{tmp_path / 'list.json'} is not a lfm-edit-memory/1 file (its format tag is None)"
    assert str(e.value) == want
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(LfmError) as e:
        MemoryPatch.load(tmp_path / "x.json")
    want = f"{tmp_path / 'x.json'} is not a lfm-edit-memory/1 file (its format tag is 'other')"
    assert str(e.value) == want
    patch = MemoryPatch([REQ], IkeConfig(k=3, encoder="chars"), method="ike-variant")
    loaded = MemoryPatch.load(patch.save(tmp_path / "p.json"))
    assert loaded.method == "ike-variant" and loaded.config.k == 3 and loaded.requests == [REQ]


def test_each_kind_answers_as_it_should_and_a_fact_without_its_true_object_is_skipped():
    from dataclasses import replace

    eiffel, other = FACTS[0], FACTS[1]
    demos = demonstrations([replace(eiffel, true=""), other])  # the first teaches no retain
    assert demos == demonstrations([other]) and demos
    fact = f"{other.prompt} {other.new}"
    assert [(d.fact, d.query, d.answer) for d in demos if d.kind == "update"] == [
        (fact, p, other.new) for p in other.paraphrases
    ]
    assert [(d.fact, d.query, d.answer) for d in demos if d.kind == "retain"] == [
        (fact, n, other.true) for n in other.neighbourhood
    ]
