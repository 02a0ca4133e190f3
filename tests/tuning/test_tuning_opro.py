"""OPRO / APE instruction optimisation through TEXT access, and prompt search's phrase pool.

A scripted proposer and a target whose answers depend on the instruction check the loop: the
best instruction is kept (ties to the shorter), unusable and repeated proposals are skipped and
counted, and the meta-prompt holds the past instructions with their scores sorted ascending. A
tiny model runs it through a narrowed and a served TEXT handle; the command saves, resumes by
replay and classifies again; prompt search's pool names the task's labels, not BBC News's.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

import lfm.tuning.opro
from lfm.access import Access, LocalModel, narrow
from lfm.cli.tuning import app
from lfm.serve import Backend, Budget, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning import recipes
from lfm.tuning.opro import (
    InstructionPrompt,
    OproConfig,
    answer_label,
    load_instruction,
    meta_prompt,
    opro,
)
from lfm.tuning.prompt_search import (
    GENERIC,
    PromptSearchConfig,
    phrase_pool,
    prompt_search,
)
from lfm.tuning.proposer import chat, parse
from lfm.tuning.replay import LOG, ReplayLog
from lfm.tuning.tasks import TextClassification, Verbalizer, few_shot
from lfm.tuning.tiny import tiny_news_lm, tiny_task

LABELS = ("business", "politics", "sport")
VERB = Verbalizer("Text: {text}\nLabel:", LABELS)
ITEMS = {"business": "shares and profit", "politics": "the vote and the party",
         "sport": "the match and the cup"}  # fmt: skip
BBC = ("news", "article", "business", "entertainment", "politics", "technology", "sport")


def _task() -> TextClassification:
    texts = [f"{ITEMS[lab]} {i}" for i in range(2) for lab in LABELS]
    return TextClassification(texts, torch.tensor([0, 1, 2] * 2), VERB)


class Target:
    """A TEXT handle whose answers depend on the instruction: every label right when it says
    "topic", business and sport only when it says "half", else no label word."""

    access = Access.TEXT

    def __init__(self):
        self.prompts: list[str] = []

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        self.prompts += prompts
        return [self._answer(p) for p in prompts]

    @staticmethod
    def _answer(prompt: str) -> str:
        gold = next(lab for lab, item in ITEMS.items() if item in prompt)
        head = prompt.split("Text:")[0].lower()
        if "topic" in head or ("half" in head and gold != "politics"):
            return f" {gold.title()}."
        return " I am not sure"


class Scripted:
    """A proposer that returns fixed outputs in order and records what it was sent."""

    access = Access.TEXT

    def __init__(self, outputs):
        self.outputs, self.sent, self.kwargs = list(outputs), [], []

    def generate(self, prompts, max_new_tokens: int = 32, **kw):
        self.sent.append(prompts[0])
        self.kwargs.append(kw)
        return [self.outputs.pop(0) for _ in prompts]


SCRIPT = [
    # step 0 (APE)
    "[Name the topic.] and more words", '  "Answer half of them."  ', "",
    # step 1 (OPRO): a repeat (case and spacing aside), a plain line, the placeholder
    "[name the  topic.]", "Instruction: Say something.\nsecond line", "<INS>",
    # step 2: as good as the best but longer, too short, a new one
    "Give the topic now.", "x", "[Answer half.]",
]  # fmt: skip


def _scored(meta: str) -> list[tuple[str, int]]:
    """The (instruction, score) pairs of an OPRO meta-prompt, in the order shown."""
    return [(t, int(s)) for t, s in re.findall(r"text:\n(.*)\nscore:\n(\d+)", meta)]


def test_an_answer_maps_to_the_label_word_it_names_first():
    words = ("business", "sport", "technology", "politics")
    cases = {" sport": 1, "Business news": 0, "It is about sport and business": 1,
             " Sports.": 1, "(Politics)": 3, "technology, then sport": 2, "transport policy": -1,
             "tech": -1, "": -1, " I am not sure": -1, "SPORT": 1, "sportsbusiness": 1}  # fmt: skip
    for answer, want in cases.items():
        assert answer_label(answer, words) == want, answer
    assert answer_label("sports", ("sport", "sports")) == 1  # the longer at one place
    assert answer_label("a sport", ("sports", "sport")) == 1


def test_a_proposal_is_parsed_into_one_instruction_or_none():
    assert parse("[Classify the text.] and then", 300) == "Classify the text."
    assert parse('  "Say the topic."\nmore', 300) == "Say the topic."
    assert parse("The instruction was: 'Pick one label.'", 300) == "Pick one label."
    assert parse("\n\nGive  the\tlabel.\x00", 300) == "Give the label."
    echoes = ("The instruction was (write it in square brackets)", "[Write your new text.]")
    for junk in ("", "  \n ", "<INS>", "[<INS>]", "12 !", "ab", *echoes):
        assert parse(junk, 300) is None, junk
    long = parse("Read the text and answer with the one label that fits it best", 20)
    assert long == "Read the text and" and len(long) <= 20


def test_a_local_proposer_uses_its_chat_template_and_a_narrowed_one_does_not():
    lm = tiny_news_lm(0)
    assert chat(lm, "hi") == "hi"  # the tiny tokenizer has no chat template
    tok = lm.tokenizer
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    with_template = LocalModel(lm.model, tok)
    assert chat(with_template, "hi") == "<u>hi</u><a>"
    assert chat(narrow(with_template, "text"), "hi") == "hi"  # no tokenizer behind the interface


def test_opro_keeps_the_best_and_shows_past_scores_sorted_ascending():
    target, proposer = Target(), Scripted(SCRIPT)
    cfg = OproConfig(steps=2, candidates=3, examples=2, temperature=0.7)
    res = opro(target, _task(), cfg, proposer=proposer, seed=0)
    assert res.start_score == 0.0 and res.best_score == 1.0
    assert res.best.instruction == "Name the topic."  # "Give the topic now." ties, longer
    assert res.skipped == {"unusable": 3, "duplicate": 1} and res.evaluations == 6
    assert [(t["step"], t["instruction"], round(t["score"], 3)) for t in res.instructions] == [
        (0, "", 0.0), (0, "Name the topic.", 1.0), (0, "Answer half of them.", 0.667),
        (1, "Say something.", 0.0), (2, "Give the topic now.", 1.0), (2, "Answer half.", 0.667),
    ]  # fmt: skip
    assert res.history == [1.0, 1.0, 1.0] and len(target.prompts) == 6 * 6

    ape, step1, step2 = proposer.sent
    assert "Input: shares and profit" in ape and "Output: sport" in ape and "text:" not in ape
    # scored in the order 0, 100, 67: shown sorted ascending, with their scores in percent
    assert _scored(step1) == [("", 0), ("Answer half of them.", 67), ("Name the topic.", 100)]
    assert _scored(step2) == [("Say something.", 0), ("", 0), ("Answer half of them.", 67),
                              ("Name the topic.", 100)]  # fmt: skip
    assert step1.count("input:\n<INS>\nText: ") == 2 and "Write your new text" in step1
    assert all(kw["temperature"] == 0.7 for kw in proposer.kwargs)
    assert len({kw["seed"] for kw in proposer.kwargs}) == 3  # each step samples afresh


def test_the_meta_prompt_keeps_the_best_few():
    tried = [{"instruction": f"ins {i}", "score": s, "order": i}
             for i, s in enumerate([0.5, 0.25, 0.75, 0.5])]  # fmt: skip
    shown = _scored(meta_prompt(tried, [], keep=3))
    assert shown == [("ins 3", 50), ("ins 0", 50), ("ins 2", 75)]  # of equal scores, first last


def test_opro_runs_through_a_narrowed_and_a_served_text_handle_and_saves(tmp_path):
    lm, task = tiny_news_lm(0), tiny_task()
    cfg = OproConfig(steps=1, candidates=2, proposal_tokens=8, example_chars=40)
    local = opro(narrow(lm, "text"), task, cfg, proposer=tiny_news_lm(1), seed=3)
    with running(build_app(Backend(lm, "text"), ServeSettings())) as url:
        served = RemoteModel(url, access="text")
        remote = opro(served, task, cfg, proposer=tiny_news_lm(1), seed=3)
        assert remote.record() == local.record()
        assert torch.equal(remote.predict(served, task.texts), local.predict(lm, task.texts))
        short = RemoteModel(url, access="text", budget=Budget(calls=2))  # the start and one more
        cut = opro(short, task, cfg, proposer=tiny_news_lm(1), seed=3)
        assert cut.stopped == "api-budget" and cut.evaluations == 2
        assert len(cut.history) < len(local.history) == 2  # it stopped within its steps
        assert cut.instructions == local.instructions[:2]
    assert local.evaluations == 1 + 2 * cfg.candidates - sum(local.skipped.values())
    local.save(tmp_path / "o")
    saved = load_instruction(tmp_path / "o")
    assert saved == local.best and saved.verbalizer == task.verbalizer
    file = json.loads((tmp_path / "o" / "instruction.json").read_text())
    assert file["score"] == local.best_score and file["history"] == local.instructions
    assert json.loads((tmp_path / "o" / "result.json").read_text())["method"] == "opro"
    pred = local.predict(narrow(lm, "text"), task.texts)
    assert float((pred == task.labels).float().mean()) == local.best_score
    scores = local.scores(narrow(lm, "text"), task.texts)
    named = pred >= 0
    assert torch.equal(scores[named].argmax(-1), pred[named])
    assert torch.isinf(scores[~named]).all()


def test_an_instruction_prompt_puts_the_instruction_before_the_template():
    p = InstructionPrompt("Name the topic.", VERB)
    assert p.prompt("the match") == "Name the topic.\n\nText: the match\nLabel:"
    assert InstructionPrompt("", VERB).prompt("the match") == "Text: the match\nLabel:"


# ------------------------------------------------------------------------------------------------
# Prompt search's phrase pool: from the task, not from BBC News.


def test_the_prompt_search_pool_names_the_task_labels_and_no_bbc_phrase():
    verb = Verbalizer("Review: {text}\nSentiment:", ("positive", "negative", "neutral"))
    pool = phrase_pool(verb)
    assert any(all(w in p for w in verb.label_words) for p in pool)
    assert all(g in pool for g in GENERIC)
    assert not [p for p in pool if any(b in p.lower() for b in BBC)]
    assert not any(b in PromptSearchConfig().instruction.lower() for b in BBC)
    words = ("yes", "no")
    assert phrase_pool(Verbalizer("{text}", words))[:2] == ("Answer with one of: yes, no.",
                                                             "The answer is yes or no.")  # fmt: skip


def test_prompt_search_draws_its_edits_from_the_task_pool_and_a_proposer():
    lm = tiny_news_lm(0)
    task = tiny_task()  # label words: sport, profit, minister
    cfg = PromptSearchConfig(iterations=3, candidates=3, patience=3, proposals=2)
    plain = prompt_search(narrow(lm, "scores"), task, cfg, seed=1)
    assert plain.pool == phrase_pool(task.verbalizer)
    assert any("sport, profit, minister" in p for p in plain.pool)
    outputs = ["[Say which one it is.]", "Pick the word that fits."]
    proposer = Scripted(outputs)
    proposed = prompt_search(narrow(lm, "scores"), task, cfg, seed=1, proposer=proposer)
    assert proposed.pool == (*phrase_pool(task.verbalizer), "Say which one it is.",
                             "Pick the word that fits.")  # fmt: skip
    assert "Output: sport" in proposer.sent[0]  # written from demonstrations of the task
    again = prompt_search(narrow(lm, "scores"), task, cfg, seed=1, proposer=Scripted(outputs))
    assert again.record() == proposed.record()  # reproducible under the seed
    start = tuple(PromptSearchConfig().instruction.split(". "))
    for res in (plain, proposed):
        assert set(res.best.phrases) <= {*res.pool, *start}


# ------------------------------------------------------------------------------------------------
# The command: save, classify again, resume by replay, one-line errors.


def _data(tmp_path) -> str:
    rows = [{"text": f"{lab} item {i}: {ITEMS[lab]}", "label": lab}
            for i in range(5) for lab in LABELS]  # fmt: skip
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _args(model: str, data: str, *extra: str) -> list[str]:
    return ["opro", "--model", model, "--proposer", model, "--data", data, "--shots", "2",
            "--steps", "2", "--candidates", "2", "--max-chars", "60", "--threads", "1", *extra]  # fmt: skip


def _result(res) -> dict:
    out = json.loads(res.stdout)
    out.pop("run")
    return out


class Killed(Exception):
    """The process dying after its evaluation log was written."""


def test_the_command_saves_classifies_again_and_resumes_by_replay(bbc_lm, tmp_path, monkeypatch):
    data = _data(tmp_path)
    calls, written, kill = [0], [], [False]
    real, flush = lfm.tuning.opro.generate_labels, ReplayLog.flush

    def target_call(*args, **kwargs):
        if kill[0] and written:
            raise Killed("killed after the first step was logged")
        calls[0] += 1
        return real(*args, **kwargs)

    def noting_flush(log):
        before = log._written
        flush(log)
        if log._written > before:
            written.append(log._written)

    monkeypatch.setattr(lfm.tuning.opro, "generate_labels", target_call)
    monkeypatch.setattr(ReplayLog, "flush", noting_flush)
    whole = CliRunner().invoke(app, [*_args(bbc_lm, data), "--root", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert "[lfm] opro step 2/2: best score" in whole.stderr
    out = json.loads(whole.stdout)
    full, logged = calls[0], json.loads((tmp_path / out["run"] / LOG).read_text())
    assert len(logged) == out["evaluations"] == full and len(written) >= 2
    manifest = json.loads((tmp_path / out["run"] / "manifest.json").read_text())
    assert manifest["history"]["best_score"]["value"] == [out["start_score"], *out["history"]]
    assert manifest["config"]["proposer"] == bbc_lm

    # the saved instruction classifies the training texts as the search scored them
    ds = recipes.labelled_data(data, shots=2)
    texts, y = few_shot(ds, 2, 0)  # the run's draw (--shots 2, --seed 0)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": ds.classes[int(c)]}) + "\n"
                             for t, c in zip(texts, y, strict=True)))  # fmt: skip
    again = recipes.predict(out["run"], data=train, progress=False)
    assert again["acc"] == out["best_score"] and again["method"] == "opro"
    one = CliRunner().invoke(app, ["classify", "--run", out["run"], "--text", texts[0]])
    assert one.exit_code == 0 and "(opro: " in one.stdout, one.output

    calls[0], written[:], kill[0] = 0, [], True
    killed = CliRunner().invoke(app, [*_args(bbc_lm, data), "--root", str(tmp_path / "runs")])
    assert isinstance(killed.exception, Killed), killed.output
    (run,) = (tmp_path / "runs").iterdir()
    cut = written[0]
    assert json.loads((run / LOG).read_text()) == logged[:cut]
    calls[0], written[:], kill[0] = 0, [], False
    resumed = CliRunner().invoke(app, [*_args(bbc_lm, data), "--root", str(tmp_path / "runs"),
                                       "--resume", str(run)])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert calls[0] == full - cut > 0  # the logged ones were replayed, not called
    assert _result(resumed) == _result(whole)
    saved = (tmp_path / out["run"] / "result" / "instruction.json").read_text()
    assert (run / "result" / "instruction.json").read_text() == saved


def _main(argv, monkeypatch, capsys) -> tuple[int, str]:
    """The `lfm` entry point in this process (as `python -m lfm` runs it): (status, stderr)."""
    import lfm.cli

    monkeypatch.setattr(sys, "argv", ["lfm", *argv])
    with pytest.raises(SystemExit) as done:
        lfm.cli.main()
    return done.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--data", "no-such.jsonl"], "no-such.jsonl"),
        (["--steps", "-1"], "--steps"),
        (["--candidates", "0"], "--candidates"),
        (["--stepz", "3"], "No such option: --stepz"),
        (["--shots", "many"], "--shots"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_command_errors_are_one_line_with_exit_status_2(argv, says, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = _main(["tuning", "opro", "--model", "no-such-model", *argv], monkeypatch, capsys)
    assert code == 2 and says in err and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("Usage:", "Try "))]
    assert 1 <= len(lines) <= 2 and sum(x.lower().startswith("error") for x in lines) == 1, err


def test_a_proposer_that_is_no_model_is_one_line(bbc_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["tuning", *_args(bbc_lm, _data(tmp_path))]
    argv[argv.index("--proposer") + 1] = "./no/such/proposer"
    code, err = _main(argv, monkeypatch, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "no/such/proposer" in lines[0], err
