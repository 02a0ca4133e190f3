"""Editing and evaluating facts of one's own (`lfm edit apply --facts`, `lfm edit eval --facts`).

A facts file has one edit per line (prompt, subject, target; optional true, paraphrases,
neighbourhood); it is applied as one batch or in sequence, and evaluated with the CounterFact
metrics before and after a patch. Every bad line is one line on the terminal, exit 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lfm.cli.edit import app
from lfm.edit import Patch, recipes
from lfm.edit.facts import read_facts
from lfm.errors import LfmError

FACTS = [
    {"prompt": "The city of the Eiffel Tower", "subject": "Eiffel Tower", "target": "Rome",
     "true": "Paris", "paraphrases": ["The Eiffel Tower is a city"],
     "neighbourhood": ["The city of the Colosseum"]},
    {"prompt": "The country of Kyoto", "subject": "Kyoto", "target": "Germany"},
]  # fmt: skip
FTL = "steps: 20\nlr: 0.1\nnorm_constraint: 1.0\n"  # strong enough to flip the tiny model


@pytest.fixture(scope="module")
def folder(smoke_folder):
    return smoke_folder


def _write(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _one_line_error(res, text: str) -> None:
    """Exit status 2 and one error line; besides it only progress lines (`[lfm] ...`)."""
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith("[lfm] ")]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert text in lines[0], res.output


def _apply(folder, facts: str, out, tmp_path, *extra: str):
    cfg = tmp_path / "ftl.yaml"
    cfg.write_text(FTL)
    args = ["apply", "--model", str(folder), "-m", "ft_l", "--facts", facts, "--config",
            str(cfg), "-o", str(out), "--root", str(tmp_path / "runs"), *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_facts_file_reads_the_packaged_shape_and_its_own():
    from importlib import resources

    packaged = resources.files("lfm.edit").joinpath("data/facts.jsonl")
    with resources.as_file(packaged) as p:
        first = read_facts(p)[0]
    assert first.request.target == first.new and first.true and first.neighbourhood


def test_apply_as_a_batch_then_eval_before_and_after(folder, tmp_path):
    facts = _write(tmp_path / "mine.jsonl", FACTS)
    res = _apply(folder, facts, tmp_path / "p.safetensors", tmp_path)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("ft_l: 2 edit(s) on ")
    manifest = json.loads(next((tmp_path / "runs").iterdir()).joinpath("manifest.json").read_text())
    assert "facts" in manifest["inputs"] and manifest["config"]["sequential"] is False
    patch = str(tmp_path / "p.safetensors")
    res = CliRunner().invoke(
        app, ["eval", "--model", str(folder), "--facts", facts, "--patch", patch]
    )
    assert res.exit_code == 0, res.output
    count, before, after = res.stdout.strip().splitlines()
    assert count == "2 fact(s)" and before.startswith("before ") and after.startswith("after ")
    scores = recipes.evaluate_facts(str(folder), facts, tmp_path / "p.safetensors")
    assert scores.after is not None and scores.after["efficacy"] == 100.0
    assert scores.before["efficacy"] < 100.0  # the edit changed what the model prefers
    assert f"efficacy {scores.after['efficacy']:.1f}" in after
    # the second fact had no `true`: the unedited model's own answer was filled in
    assert scores.facts[1].true and scores.facts[1].true != "Germany"
    alone = CliRunner().invoke(app, ["eval", "--model", str(folder), "--facts", facts])
    assert alone.exit_code == 0 and len(alone.stdout.strip().splitlines()) == 2


def test_sequential_sums_the_edits_made_one_after_another(folder, tmp_path):
    facts = _write(tmp_path / "mine.jsonl", FACTS)
    out = tmp_path / "seq.safetensors"
    assert _apply(folder, facts, out, tmp_path, "--sequential").exit_code == 0
    seq = Patch.load(out)
    # by hand: the first edit, applied, then the second on the edited weights
    h = recipes.load_handle(str(folder))
    cfg = recipes._config(recipes.registry.get("ft_l", area="edit"), tmp_path / "ftl.yaml")
    reqs = [f.request for f in read_facts(facts)]
    first = recipes.registry.run("edit/ft_l", h, [reqs[0]], cfg=cfg)
    undo = first.apply(h.model)
    second = recipes.registry.run("edit/ft_l", h, [reqs[1]], cfg=cfg)
    undo.revert(h.model)
    ((d,),) = [seq.deltas]
    want = first.deltas[0].matrix() + second.deltas[0].matrix()
    assert torch.allclose(d.matrix(), want, atol=1e-6)
    batch = tmp_path / "batch.safetensors"
    assert _apply(folder, facts, batch, tmp_path).exit_code == 0
    assert not torch.allclose(Patch.load(batch).deltas[0].matrix(), d.matrix())
    with pytest.raises(LfmError, match="memory patch"):
        recipes.apply(h, "ike", (), tmp_path / "m.json", facts=facts, sequential=True,
                      root=tmp_path / "runs")  # fmt: skip


def test_a_set_without_paraphrases_scores_over_the_other_metrics(folder, tmp_path):
    facts = _write(tmp_path / "bare.jsonl", [FACTS[1]])
    scores = recipes.evaluate_facts(str(folder), facts)
    assert math.isnan(scores.before["paraphrase"]) and not math.isnan(scores.before["score"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('["a list"]', "line 2: not a JSON object"),
        (json.dumps({"prompt": "The city of X", "subject": "X"}), "line 2: no 'target'"),
        (json.dumps({**FACTS[1], "subject": "Tokyo"}), "line 2: subject 'Tokyo' does not occur"),
        (json.dumps({**FACTS[1], "paraphrases": "one"}), "line 2: 'paraphrases' must be a list"),
    ],
)
def test_bad_lines_are_one_line_errors(folder, tmp_path, line, message):
    facts = _write(tmp_path / "bad.jsonl", [FACTS[0], line])
    _one_line_error(_apply(folder, facts, tmp_path / "p.safetensors", tmp_path), message)
    _one_line_error(
        CliRunner().invoke(app, ["eval", "--model", str(folder), "--facts", facts]), message
    )


def test_missing_file_and_missing_patch_are_one_line_errors(folder, tmp_path):
    gone = str(tmp_path / "none.jsonl")
    _one_line_error(_apply(folder, gone, tmp_path / "p.st", tmp_path), "cannot read facts")
    _one_line_error(CliRunner().invoke(app, ["eval", "--model", str(folder)]), "give a PATCH")
