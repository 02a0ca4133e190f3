"""`lfm reuse ensemble`: label-word classification by an ensemble of tiny LMs saved to folders."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.access import LocalModel
from lfm.reuse.ensemble import (
    EnsembleConfig,
    ensemble_label_words,
    label_word_logprobs,
    vote_labels,
)

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
    want = ensemble_label_words(handles, TEXTS, WORDS, EnsembleConfig(weights=(1, 2, 1))).argmax(-1)
    assert json.loads(out.read_text())["predictions"] == [WORDS[i].strip() for i in want.tolist()]


def test_vote_matches_the_library(folders):
    root, paths, handles = folders
    result, out = _run(root, paths, "--mode", "vote")
    assert result.exit_code == 0, result.output
    members = [label_word_logprobs(h, TEXTS, WORDS).argmax(-1) for h in handles]
    want = vote_labels(members)
    assert json.loads(out.read_text())["predictions"] == [WORDS[i].strip() for i in want.tolist()]
    # the members disagree somewhere, or the vote would test nothing beyond one model
    assert any(not torch.equal(members[0], m) for m in members[1:])


def test_bad_weights_fail_in_one_line(folders):
    root, paths, _ = folders
    result, _ = _run(root, paths, "--weights", "1,2")
    assert result.exit_code == 1
    assert "2 weights for 3 models" in result.output
