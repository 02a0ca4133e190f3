"""`lfm reuse ensemble` and its recipe: label-word classification by an ensemble of tiny LMs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.access import LocalModel, narrow
from lfm.errors import AccessError
from lfm.reuse.ensemble import (
    EnsembleConfig,
    LabelWords,
    ensemble_average,
    label_word_logprobs,
    vote_labels,
)
from lfm.reuse.recipes import classify_texts

from conftest import make_lm

TEXTS = [
    "The Eiffel Tower is in",
    "Tokyo is a large city in",
    "The capital of Italy is",
    "Paris is",
]
WORDS = [" a", " e", " o"]  # short words: random tiny models then disagree on some texts
SEEDS = (0, 1, 3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    paths, handles = [], []
    for seed in SEEDS:
        model, tok = make_lm("llama", seed=seed)
        model.save_pretrained(root / f"m{seed}")
        tok.save_pretrained(root / f"m{seed}")
        paths.append(str(root / f"m{seed}"))
        handles.append(LocalModel(model, tok))
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return root, paths, handles


def _run(root, paths, *extra):
    out = root / "pred.json"
    args = ["ensemble", *paths, "--texts", str(root / "texts.txt"), "--labels", ",".join(WORDS)]
    result = CliRunner().invoke(_app(), [*args, "--template", "{text}", "-o", str(out), *extra])
    return result, out


def _app():
    from lfm.cli.reuse import app

    return app


def test_average_matches_the_library(folders):
    root, paths, handles = folders
    result, out = _run(root, paths, "--weights", "1,2,1")
    assert result.exit_code == 0, result.output
    members = [LabelWords(h, WORDS) for h in handles]
    want = ensemble_average(members, TEXTS, EnsembleConfig(weights=(1, 2, 1))).argmax(-1)
    assert json.loads(out.read_text())["predictions"] == [WORDS[i].strip() for i in want.tolist()]
    # by hand: the weighted mean of the members' label-word probabilities
    probs = [label_word_logprobs(h, TEXTS, WORDS).exp() for h in handles]
    mean = (probs[0] + 2 * probs[1] + probs[2]) / 4
    assert torch.equal(mean.argmax(-1), want)


def test_vote_matches_the_library(folders):
    root, paths, handles = folders
    result, out = _run(root, paths, "--method", "ensemble_vote")
    assert result.exit_code == 0, result.output
    members = [label_word_logprobs(h, TEXTS, WORDS).argmax(-1) for h in handles]
    want = vote_labels(members)
    assert json.loads(out.read_text())["predictions"] == [WORDS[i].strip() for i in want.tolist()]
    # the members disagree somewhere, or the vote would test nothing beyond one model
    assert any(not torch.equal(members[0], m) for m in members[1:])


def _one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (
        result.output
    )
    return lines[0]


def test_user_errors_fail_in_one_line_with_status_2(folders):
    root, paths, _ = folders
    assert "2 weights for 3 models" in _one_line_error(_run(root, paths, "--weights", "1,2")[0])
    assert "numbers separated by commas" in _one_line_error(
        _run(root, paths, "--weights", "1,x,2")[0]
    )
    assert "did you mean 'ensemble_vote'" in _one_line_error(
        _run(root, paths, "-m", "ensemble_vot")[0]
    )
    assert "not an ensemble" in _one_line_error(_run(root, paths, "-m", "ties")[0])
    assert "only {text}" in _one_line_error(_run(root, paths, "--template", "{txt}")[0])


def test_recipe_from_python_takes_handles_and_the_method_by_name(folders):
    _, _, handles = folders
    scores = [narrow(h, "scores") for h in handles]
    vote = classify_texts(scores, method="ensemble_vote", labels=[w.strip() for w in WORDS],
                          texts=_texts_file(folders), template="{text}")  # fmt: skip
    members = [label_word_logprobs(h, TEXTS, WORDS).argmax(-1) for h in handles]
    assert vote.method == "ensemble_vote" and vote.accuracy is None
    assert vote.predictions == [WORDS[i].strip() for i in vote_labels(members).tolist()]
    assert all(torch.equal(a, b) for a, b in zip(vote.members, members, strict=True))
    with pytest.raises(AccessError, match="label-word classification needs SCORES"):
        classify_texts([narrow(handles[0], "text")], labels=["a"], texts=_texts_file(folders))


def _texts_file(folders):
    return folders[0] / "texts.txt"


def test_a_served_member_scores_like_its_local_copy(folders):
    from lfm.serve import Backend, ServeSettings, build_app
    from lfm.serve.thread import running

    root, paths, handles = folders
    local, _ = _run(root, paths, "--weights", "1,2,1")
    want = json.loads((root / "pred.json").read_text())["predictions"]
    app = build_app(Backend(handles[1], "scores"), ServeSettings(api_key="k"))
    with running(app) as url:
        served, _ = _run(root, [paths[0], url, paths[2]], "--weights", "1,2,1", "--api-key", "k")
        assert served.exit_code == 0, served.output
        assert json.loads((root / "pred.json").read_text())["predictions"] == want
        refused, _ = _run(root, [paths[0], url], "--api-key", "wrong")
    assert local.exit_code == 0 and refused.exit_code == 2, refused.output
    errors = [x for x in refused.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "401" in errors[0] and "Traceback" not in refused.output


def test_a_labelled_file_of_ones_own_gives_each_accuracy(folders):
    root, paths, handles = folders
    gold = ["o", "a", "e", "a"]  # one label per text; the label words are the labels
    (root / "own.jsonl").write_text(
        "".join(json.dumps({"body": t, "y": g}) + "\n" for t, g in zip(TEXTS, gold, strict=True))
    )
    args = ["ensemble", *paths, "--data", str(root / "own.jsonl"), "--text-field", "body",
            "--label-field", "y", "--template", "{text}", "-o", str(root / "own.json")]  # fmt: skip
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    words = [" a", " e", " o"]  # sorted labels, each after a space
    truth = torch.tensor([words.index(f" {g}") for g in gold])
    members = [label_word_logprobs(h, TEXTS, words).argmax(-1) for h in handles]
    want = {p: float((m == truth).float().mean()) for p, m in zip(paths, members, strict=True)}
    ens = ensemble_average([LabelWords(h, words) for h in handles], TEXTS, EnsembleConfig())
    want["ensemble"] = float((ens.argmax(-1) == truth).float().mean())
    assert json.loads((root / "own.json").read_text())["accuracy"] == pytest.approx(want)
    assert "accuracy:" in res.stdout
    wrong = CliRunner().invoke(_app(), [*args[:-2], "--labels", "x,y"])
    assert "2 label words for the 3 labels" in _one_line_error(wrong)
