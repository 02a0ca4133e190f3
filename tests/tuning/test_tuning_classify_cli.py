"""`lfm tuning classify`: classifying again with what a run saved, and the runs' learning curves.

The predictions of a saved run are the run's own: a trained adapter or head gives the held-out
accuracy the run reported on the same held-out file, a saved BBT prompt the loss its search
reported on the same training texts. Each training run keeps its curves in the manifest's
`history` and draws `curves.png`; long steps show progress on stderr.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.cli.tuning import app
from lfm.core.tiny import tiny_lm
from lfm.tuning import recipes
from lfm.tuning.tasks import few_shot, held_out

from conftest import BBC_WORDS, CORPUS

LABELS = ("business", "politics", "sport")  # single tokens of the tokenizer below


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    """A seeded tiny Llama saved as a folder, whose tokenizer has the label words as tokens."""
    model, tok = tiny_lm("llama", 0, corpus=[BBC_WORDS * 40, *CORPUS])
    path = tmp_path_factory.mktemp("lm") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _rows(per_class: int) -> list[dict[str, str]]:
    words = {"business": "shares and profit", "politics": "the vote and the party",
             "sport": "the match and the cup"}  # fmt: skip
    return [{"text": f"item {i}: {words[label]} of {label}", "label": label}
            for i in range(per_class) for label in LABELS]  # fmt: skip


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _held_out_file(path, data: str, shots: int) -> str:
    """The examples the run evaluated (`--eval-per-class 0`: all held out), in its order."""
    ds = recipes.labelled_data(data, shots=shots)
    texts, y = held_out(ds, 0)
    return _write(
        path, [{"text": t, "label": ds.classes[int(c)]} for t, c in zip(texts, y, strict=True)]
    )


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _one_line_error(res, text: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and text in lines[0], res.output
    assert "Traceback" not in res.output


def _manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_a_lora_run_classifies_its_held_out_file_with_the_accuracy_it_reported(lm, tmp_path):
    data = _write(tmp_path / "d.jsonl", _rows(10))  # 2 of each class held out
    res = _invoke("train", "--method", "lora", "--model", lm, "--data", data, "--shots", "4",
                  "--steps", "4", "--lr", "2e-2", "--eval-per-class", "0", "--eval-every", "2",
                  "--max-chars", "60", "--threads", "1", "--root", str(tmp_path / "runs"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "zero-shot" in res.stderr  # the bar of the evaluation before training
    (run,) = (tmp_path / "runs").iterdir()
    m = _manifest(run)
    acc, zero = m["metrics"]["acc"], m["metrics"]["zero_shot_acc"]
    assert m["metrics"]["classes"] == list(LABELS) and m["metrics"]["split"] == {
        "train": 24, "held_out": 6, "evaluated": 6
    }  # fmt: skip
    # the curves: a loss per step, the accuracy at step 0 (zero-shot) and at each evaluation
    assert m["history"]["loss"]["step"] == [1, 2, 3, 4]
    assert m["history"]["acc"]["step"] == [0, 2, 4]
    curve = m["history"]["acc"]["value"]
    assert len(curve) == 3 and curve[0] == zero and curve[-1] == acc
    assert (run / "curves.png").stat().st_size > 0

    held = _held_out_file(tmp_path / "held.jsonl", data, shots=4)
    out = tmp_path / "preds.jsonl"
    again = _invoke("classify", "--run", str(run), "--data", held, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert f"lora: 6 texts classified; accuracy {acc:.3f}" in again.stdout
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 6 and all(len(p["scores"]) == 3 for p in preds)
    assert sum(p["prediction"] == p["label"] for p in preds) / 6 == pytest.approx(acc)
    # the adapter matters: the base model alone scores otherwise
    saved = recipes.predict(run, data=held, progress=False)
    assert saved["acc"] == pytest.approx(acc) and acc != zero

    one = _invoke("classify", "--run", str(run), "--text", "item 9: shares and profit")
    assert one.exit_code == 0, one.output
    assert one.stdout.split()[0] in LABELS and "business" in one.stdout


def test_a_bbt_run_classifies_with_the_loss_its_search_reported(lm, tmp_path):
    data = _write(tmp_path / "d.jsonl", _rows(5))
    res = _invoke("bbt", "--model", lm, "--data", data, "--shots", "2", "--budget", "41",
                  "--n-tokens", "2", "--dim", "4", "--max-chars", "60", "--seed", "1",
                  "--threads", "1", "--root", str(tmp_path / "runs"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "best_loss=" in res.stderr  # the bar over the CMA-ES evaluations
    summary = json.loads(res.stdout)
    (run,) = (tmp_path / "runs").iterdir()
    curve = _manifest(run)["history"]["best_loss"]
    assert curve["value"][0] == pytest.approx(summary["start_loss"])
    assert curve["value"][1:] == pytest.approx(summary["history"]) and len(curve["step"]) >= 3
    assert curve["value"] == sorted(curve["value"], reverse=True)  # the best so far never rises
    assert summary["best_loss"] < summary["start_loss"]  # so the saved prompt is not the start

    ds = recipes.labelled_data(data, shots=2)
    texts, y = few_shot(ds, 2, 1)  # the training texts the search scored
    train = _write(tmp_path / "train.jsonl",
                   [{"text": t, "label": ds.classes[int(c)]} for t, c in zip(texts, y, strict=True)])  # fmt: skip
    out = tmp_path / "preds.jsonl"
    again = _invoke("classify", "--run", str(run), "--data", train, "-o", str(out))
    assert again.exit_code == 0, again.output
    scores = torch.tensor([json.loads(line)["scores"] for line in out.read_text().splitlines()])
    loss = float(torch.nn.functional.cross_entropy(scores, y))
    assert loss == pytest.approx(summary["best_loss"], abs=1e-4)


def test_a_prompt_search_run_classifies_one_text_as_its_template_does(lm, tmp_path):
    data = _write(tmp_path / "d.jsonl", _rows(5))
    res = _invoke("prompt-search", "--model", lm, "--data", data, "--shots", "2",
                  "--iterations", "2", "--candidates", "1", "--max-chars", "60",
                  "--root", str(tmp_path / "runs"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "[lfm] prompt search step 1/2: best score" in res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert _manifest(run)["history"]["best_score"]["xlabel"] == "search step"
    text = "item 7: the match and the cup of sport"
    expected = recipes.saved_scores(run, lm, [text])[0]
    out = recipes.predict(run, text=text, progress=False)
    assert out["scores"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert out["prediction"] == LABELS[int(expected.argmax())]


def test_an_encoder_trains_a_new_head_on_a_data_file_and_classifies_again(tmp_path):
    model, tok = tiny_lm("bert", 0)
    model.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    cities = ("Paris", "Rome", "Madrid", "Berlin", "Tokyo")
    rows = [r for i in range(10) for r in (
        {"body": f"{cities[i % 5]} is the capital city number {i}.", "topic": "capital"},
        {"body": f"A small model learns from a large model {i}.", "topic": "model"},
    )]  # fmt: skip
    data = _write(tmp_path / "d.jsonl", rows)
    res = _invoke("train", "--method", "full_ft", "--model", str(tmp_path / "bert"), "--data",
                  data, "--text-field", "body", "--label-field", "topic", "--shots", "4",
                  "--steps", "6", "--lr", "1e-3", "--head-lr", "1e-2", "--batch-size", "8",
                  "--eval-per-class", "0", "--threads", "1", "--root", str(tmp_path / "runs"))  # fmt: skip
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    m = _manifest(run)
    c = m["config"]
    assert (c["data"], c["text_field"], c["label_field"], c["holdout"]) == (
        data, "body", "topic", 0.2
    )  # fmt: skip
    assert m["metrics"]["split"] == {"train": 16, "held_out": 4, "evaluated": 4}
    acc = m["metrics"]["acc"]
    assert acc > 0.5 + 0.2  # above chance (2 classes) on the held-out part
    loss = m["history"]["loss"]["value"]
    assert len(loss) == 6 and loss[-1] < loss[0]
    assert (run / "tuned" / "head.safetensors").exists()
    ds = recipes.labelled_data(data, "body", "topic", shots=4)
    texts, y = held_out(ds, 0)
    held = _write(tmp_path / "held.jsonl",
                  [{"body": t, "topic": ds.classes[int(k)]} for t, k in zip(texts, y, strict=True)])  # fmt: skip
    out = recipes.predict(run, data=held, text_field="body", label_field="topic", progress=False)
    assert out["classes"] == ["capital", "model"] and out["acc"] == pytest.approx(acc)


def test_runs_without_a_classifier_and_bad_requests_are_one_line_errors(lm, tmp_path):
    _one_line_error(_invoke("classify", "--run", str(tmp_path), "--text", "x"),
                    "is not a run directory")  # fmt: skip
    aug = tmp_path / "aug"
    (aug / "augmented").mkdir(parents=True)
    (aug / "manifest.json").write_text(json.dumps({"name": "augment-knn_lm", "config": {}}))
    _one_line_error(_invoke("classify", "--run", str(aug), "--text", "x"), "saved nothing")
    sft = tmp_path / "sft"
    (sft / "tuned").mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({"name": "sft-lora", "config": {"model": "m"}}))
    (sft / "tuned" / "result.json").write_text(json.dumps({"verbalizer": None}))
    _one_line_error(_invoke("classify", "--run", str(sft), "--text", "x"), "instruction-tuned")
    _one_line_error(_invoke("classify", "--run", str(sft), "--text", "x", "--url", "http://h"),
                    "instruction-tuned")  # fmt: skip

    data = _write(tmp_path / "d.jsonl", _rows(5))
    res = _invoke("train", "--model", lm, "--data", data, "--shots", "1", "--steps", "1",
                  "--max-chars", "40", "--root", str(tmp_path / "runs"))  # fmt: skip
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    _one_line_error(_invoke("classify", "--run", str(run)), "--data")
    _one_line_error(_invoke("classify", "--run", str(run), "--text", "x", "--url", "http://h"),
                    "locally (--model)")  # fmt: skip
    other = _write(tmp_path / "o.jsonl", [{"text": "a", "label": "weather"}])
    _one_line_error(_invoke("classify", "--run", str(run), "--data", other),
                    "label 'weather' is not a class of the run")  # fmt: skip
    unlabelled = _write(tmp_path / "u.jsonl", [{"text": "item 1: the vote"}, {"text": "b"}])
    res = _invoke("classify", "--run", str(run), "--data", unlabelled)
    assert (
        res.exit_code == 0 and "2 texts classified" in res.stdout and "accuracy" not in res.stdout
    )
