"""Tuning on a classification file of one's own (`--data`), and reusing a saved black-box prompt.

The file is JSON lines or CSV; its label strings become the label words; a deterministic
held-out part of each class gives the reported accuracy; every bad input is one line, exit 2.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.assets.labelled import read_labelled
from lfm.cli.tuning import app
from lfm.core.runs import path_sha256
from lfm.errors import ConfigError
from lfm.tuning import recipes
from lfm.tuning.tasks import labelled_dataset

LABELS = ("business", "politics", "sport")  # single tokens of the `bbc_lm` tokenizer


def make_rows(per_class: int = 5) -> list[dict[str, str]]:
    """`per_class` short texts of each label, classes interleaved as a file would mix them."""
    return [
        {"text": f"{label} news item {i}: the {label} story", "label": label}
        for i in range(per_class)
        for label in LABELS
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _one_line_error(res, text: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and text in lines[0], res.output
    assert "Traceback" not in res.output


def _train(model: str, data: str, root, *extra: str):
    args = ["train", "--model", model, "--data", data, "--shots", "2", "--steps", "2",
            "--eval-per-class", "0", "--max-chars", "60", "--threads", "1", "--root", str(root),
            *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_the_split_is_per_class_deterministic_and_every_kth_equals_its_fraction():
    rows = make_rows(10)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    ds = labelled_dataset("f", texts, labels, 0.2)
    assert ds.classes == LABELS and len(ds.test_texts) == 6 and len(ds.train_texts) == 24
    # the 5th and 10th example of each class are held out
    assert sorted(ds.test_texts) == sorted(
        f"{lab} news item {i}: the {lab} story" for lab in LABELS for i in (4, 9)
    )
    again, every5 = (
        labelled_dataset("f", texts, labels, 0.2),
        labelled_dataset("f", texts, labels, 5),
    )
    for other in (again, every5):
        assert other.test_texts == ds.test_texts and torch.equal(other.y_test, ds.y_test)
    assert len(labelled_dataset("f", texts, labels, 0.5).test_texts) == 15


def test_csv_and_jsonl_read_the_same_examples(tmp_path):
    rows = [{"body": r["text"], "topic": r["label"]} for r in make_rows(3)]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["body", "topic"])
        w.writeheader()
        w.writerows(rows)
    from_csv = read_labelled(tmp_path / "d.csv", "body", "topic")
    from_json = read_labelled(write_jsonl(tmp_path / "d.jsonl", rows), "body", "topic")
    assert from_csv == from_json and from_csv[1][:3] == list(LABELS)


def test_train_on_a_data_file_records_its_hash_and_fields(bbc_lm, tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", make_rows(5))
    res = _train(bbc_lm, data, tmp_path / "runs", "--method", "lora", "--lr", "1e-2")
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "on 3 held out" in res.output  # 1 held out per class
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["inputs"]["data"]["sha256"] == path_sha256(data)
    c = manifest["config"]
    assert (c["data"], c["text_field"], c["label_field"], c["holdout"]) == (
        data, "text", "label", 0.2
    )  # fmt: skip
    record = json.loads((run / "tuned" / "result.json").read_text())
    assert record["verbalizer"]["label_words"] == list(LABELS)  # the label strings


def test_bad_data_files_are_one_line_errors(bbc_lm, tmp_path):
    root = tmp_path / "runs"
    _one_line_error(_train(bbc_lm, str(tmp_path / "none.jsonl"), root), "cannot read the data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(make_rows(1)[0]) + "\n{not json\n")
    _one_line_error(_train(bbc_lm, str(bad), root), "bad.jsonl, line 2: not JSON")
    rows = make_rows(5)
    data = write_jsonl(tmp_path / "ok.jsonl", rows)
    _one_line_error(_train(bbc_lm, data, root, "--label-field", "topic"), "line 1: no 'topic'")
    one = write_jsonl(tmp_path / "one.jsonl", [r for r in rows if r["label"] == "sport"])
    _one_line_error(_train(bbc_lm, one, root), "need at least 2")
    few = write_jsonl(tmp_path / "few.jsonl", [*make_rows(5), {"text": "x y", "label": "tech"}])
    _one_line_error(_train(bbc_lm, few, root), "class 'tech' has 1 examples")
    _one_line_error(_train(bbc_lm, data, root, "--holdout", "1.5"), "holdout must be")
    short = tmp_path / "short.csv"
    short.write_text("text,label\nan item,sport\nonly one field\n")
    _one_line_error(_train(bbc_lm, str(short), root), "short.csv, line 3: 1 fields")
    assert not root.exists()  # every file was refused before a run began


def test_saved_bbt_prompt_and_template_classify_as_the_search_did(bbc_lm, tmp_path):
    from lfm.access import narrow
    from lfm.assets import load_model
    from lfm.tuning.bbt import BBTConfig, bbt
    from lfm.tuning.prompt_search import PromptSearchConfig, prompt_search
    from lfm.tuning.tasks import TextClassification, labelled_verbalizer

    rows = make_rows(4)
    verb = labelled_verbalizer(LABELS, 60)
    task = TextClassification([r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows],
                              verb)  # fmt: skip
    handle = load_model(bbc_lm, kind="causal-lm")
    found = {
        "bbt": bbt(narrow(handle, "embeddings"), task,
                   BBTConfig(n_tokens=2, intrinsic_dim=4, popsize=4, budget=9), seed=3),
        "search": prompt_search(narrow(handle, "scores"), task,
                                PromptSearchConfig(iterations=2, candidates=2), seed=3),
    }  # fmt: skip
    for name, result in found.items():
        result.save(tmp_path / name)
        before = result.scores(handle, task.texts)
        after = recipes.saved_scores(tmp_path / name, bbc_lm, task.texts)
        assert torch.allclose(before, after, atol=1e-5), name
        acc = lambda s: float((s.argmax(-1) == task.labels).float().mean())  # noqa: E731
        assert acc(after) == acc(before)
    with pytest.raises(ConfigError, match="holds no saved prompt"):
        recipes.saved_scores(tmp_path, bbc_lm, task.texts)


def test_black_box_commands_take_a_data_file(bbc_lm, tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", make_rows(5))
    args = ["bbt", "--model", bbc_lm, "--data", data, "--shots", "2", "--budget", "5",
            "--n-tokens", "2", "--dim", "4", "--max-chars", "60", "--root", str(tmp_path / "r")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verbalizer"]["label_words"] == list(LABELS)
    (run,) = (tmp_path / "r").iterdir()
    assert json.loads((run / "manifest.json").read_text())["inputs"]["data"]["sha256"] == (
        path_sha256(data)
    )
    scores = recipes.saved_scores(run, bbc_lm, ["sport news item 9: the sport story"])
    assert scores.shape == (1, 3)
    bad = CliRunner().invoke(app, ["prompt-search", "--model", bbc_lm, "--data", data,
                                   "--shots", "9", "--root", str(tmp_path / "r")])  # fmt: skip
    _one_line_error(bad, "it needs 9 to train on")
