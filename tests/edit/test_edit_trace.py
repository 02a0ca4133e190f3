"""Causal tracing on a tiny model: shape, exact endpoints, determinism, files."""

from __future__ import annotations

import json

import pytest
import torch

from lfm.access import LocalModel
from lfm.core.runs import path_sha256
from lfm.edit.trace import causal_trace, figure, plot

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


@pytest.fixture(autouse=True)
def _keep_threads():
    """`lfm edit trace` run in-process sets torch's CPU threads (`--threads`, default 2); sums
    split over another number of threads round differently, and a trace compared exactly with
    `traced` would see it. Restore the suite's count after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def traced():
    from conftest import make_lm

    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    return model, tok, causal_trace(h, PROMPT, SUBJECT, samples=3, noise=10.0)


def test_trace_has_a_layer_by_token_grid_with_exact_endpoints(traced):
    model, tok, t = traced
    n_tok = len(tok(PROMPT)["input_ids"])
    assert len(t.effect) == model.config.num_hidden_layers and len(t.effect[0]) == n_tok
    start, end = t.subject
    assert t.tokens[start:end] and "".join(t.tokens[start:end]).strip() == SUBJECT
    assert t.corrupted != pytest.approx(t.clean, abs=1e-6)  # the noise does something
    # the last block's output at the last token fixes the logits: restoring it recovers p*
    assert t.effect[-1][-1] == pytest.approx(t.clean, rel=1e-4)
    # tokens before the subject are not corrupted: restoring them changes nothing
    assert all(row[0] == pytest.approx(t.corrupted, rel=1e-4) for row in t.effect)


def test_trace_is_seeded_and_writes_json_and_png(traced, tmp_path):
    model, tok, t = traced
    again = causal_trace(LocalModel(model, tok), PROMPT, SUBJECT, samples=3, noise=10.0)
    assert again == t
    data = json.loads(t.save(tmp_path / "t.json").read_text())
    assert data["effect"] == t.effect and data["answer"] == t.answer
    png = plot(t, tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_trace_writes_the_heat_map_and_numbers(traced, tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    model, tok, _ = traced
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["trace", "--model", str(tmp_path / "m"), "--prompt", PROMPT, "--subject", SUBJECT]
    res = CliRunner().invoke(app, [*args, "--samples", "2", "--out", str(tmp_path / "h.png"),
                                   "--root", str(tmp_path / "runs"), "--threads", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "h.json").read_text())
    assert len(data["effect"]) == 2 and (tmp_path / "h.png").stat().st_size > 1000
    assert "peak" in res.stdout
    # progress: stage lines, and a bar over the 2 layers x tokens x 2 samples restorations
    n = 2 * len(data["tokens"]) * 2
    assert "[lfm] loading the model" in res.stderr and "[lfm] writing the heat map" in res.stderr
    assert "restorations:" in res.stderr and f"/{n} [" in res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and res.stdout.splitlines()[-1] == f"run: {run}"
    assert manifest["inputs"]["model"]["sha256"] == path_sha256(tmp_path / "m")
    assert manifest["outputs"] == [str(tmp_path / "h.png"), str(tmp_path / "h.json")]


def test_recipe_traces_from_python_and_refuses_a_narrowed_handle(traced, tmp_path):
    from lfm.access import narrow
    from lfm.edit import recipes
    from lfm.errors import AccessError

    model, tok, t = traced
    h = LocalModel(model, tok)
    runs = tmp_path / "runs"
    done = recipes.trace(h, PROMPT, SUBJECT, tmp_path / "t.png", samples=3, noise=10.0, root=runs)
    assert done.trace == t and done.json == tmp_path / "t.json" and done.png.exists()
    value, layer, i = done.peak
    assert value == max(max(row) for row in t.effect) == t.effect[layer][i]
    with pytest.raises(AccessError, match=r"needs WEIGHTS access.*only HIDDEN"):
        recipes.trace(narrow(h, "hidden"), PROMPT, SUBJECT, tmp_path / "n.png", root=runs)
    assert not (tmp_path / "n.png").exists()
    status = sorted(json.loads((r / "manifest.json").read_text())["status"] for r in runs.iterdir())
    assert status[0] == "done" and status[1].startswith("failed: AccessError: ")


def test_heat_map_labels_its_axes_and_colour_bar(traced):
    _, _, t = traced
    ax, bar = figure(t).axes  # the heat map and its colour bar
    assert bar.get_ylabel() == f"p({t.answer!r}) with the state restored"
    assert ax.get_xlabel().startswith("layer") and ax.get_ylabel().startswith("token")
    ticks = [x.get_text() for x in ax.get_yticklabels()]
    assert len(ticks) == len(t.tokens) and ticks[0] == repr(t.tokens[0])
    start, end = t.subject
    assert all(x.endswith("*") for x in ticks[start:end]) and not ticks[0].endswith("*")


def test_cli_seed_sets_the_noise(traced, tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    model, tok, _ = traced
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    effects = []
    for seed, name in (("0", "a"), ("0", "b"), ("1", "c")):
        args = ["trace", "--model", str(tmp_path / "m"), "--prompt", PROMPT, "--subject", SUBJECT,
                "--samples", "2", "--seed", seed, "-o", str(tmp_path / f"{name}.png"), "--root",
                str(tmp_path / "runs")]  # fmt: skip
        assert CliRunner().invoke(app, args).exit_code == 0
        effects.append(json.loads((tmp_path / f"{name}.json").read_text())["effect"])
    assert effects[0] == effects[1] and effects[0] != effects[2]
