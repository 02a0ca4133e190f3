"""GRACE: a codebook at one layer replaces its output where a key is hit, and nowhere else."""

from __future__ import annotations

import importlib

import pytest
import torch

from lfm import registry
from lfm.core.io import save_tensors
from lfm.edit import CodebookPatch, GraceConfig, Request, common, grace
from lfm.edit.grace import Codebook, update
from lfm.errors import LfmError

grace_mod = importlib.import_module("lfm.edit.grace")  # `lfm.edit.grace` is also the function
REQ = common.SMOKE_REQUEST  # "The city of the Eiffel Tower" -> " Rome"
UNRELATED = "The Colosseum is located in the city of"
# keys of the tiny model are ~0.06 long: a radius of 1e-3 keeps distinct prompts apart
CFG = GraceConfig(steps=5, eps_init=1e-3)
WORDS = ["Tower", "Colosseum", "Paris", "Rome", "France", "Berlin", "Germany", "Tokyo", "Japan", "Kyoto", "capital", "city", "large", "old", "located", "Eiffel", "is", "an", "a", "of"]  # fmt: skip


@pytest.fixture(scope="module")
def h():
    return common.smoke_model("llama", 1)  # " Paris" leads " Rome" on REQ before the edit


def _margin(h) -> float:
    s = h.score([REQ.prompt] * 2, [" Rome", " Paris"])
    return float(s[0] - s[1])


def _hooks(h, patch) -> int:
    return len(h.model.get_submodule(patch.module)._forward_hooks)


def test_edit_wins_unrelated_unchanged_and_revert_is_exact(h):
    weights = {k: v.clone() for k, v in h.model.state_dict().items()}
    base_edit = h.next_token_logprobs([REQ.prompt])
    base_other = h.next_token_logprobs([UNRELATED])
    assert _margin(h) < 0
    patch = registry.run("edit", "grace", h, REQ, cfg=CFG)
    assert isinstance(patch, CodebookPatch) and len(patch.codebook.labels) == 1
    assert torch.equal(h.next_token_logprobs([REQ.prompt]), base_edit)  # computing changes nothing
    undo = patch.apply(h.model)
    assert _margin(h) > 0, "GRACE did not make ' Rome' win"
    assert torch.equal(h.next_token_logprobs([UNRELATED]), base_other)  # passes through untouched
    undo.revert(h.model)
    assert _hooks(h, patch) == 0
    assert torch.equal(h.next_token_logprobs([REQ.prompt]), base_edit)
    assert all(torch.equal(weights[k], v) for k, v in h.model.state_dict().items())


def test_without_the_replacement_the_edit_does_not_win(h, monkeypatch):
    """The defining step removed (the layer's output passed through): the test above would fail."""
    patch = grace(h, REQ, CFG)
    monkeypatch.setattr(grace_mod, "replace_hits", lambda book, x, out: out)
    undo = patch.apply(h.model)
    try:
        assert _margin(h) < 0
    finally:
        undo.revert(h.model)


def test_twenty_sequential_edits_all_hold(h):
    reqs = [
        Request(f"The city of the {w}", w, WORDS[(i + 7) % len(WORDS)]) for i, w in enumerate(WORDS)
    ]
    before = [float(h.score([r.prompt], [f" {r.target}"])) for r in reqs]
    patch = None
    for r in reqs:  # one edit at a time, into one codebook
        patch = grace(h, r, CFG, codebook=patch)
    assert patch is not None and len(patch.requests) == 20 and len(patch.codebook.labels) == 20
    undo = patch.apply(h.model)
    try:
        after = [float(h.score([r.prompt], [f" {r.target}"])) for r in reqs]
    finally:
        undo.revert(h.model)
    gains = [a - b for a, b in zip(after, before, strict=True)]
    assert min(gains) > 0.3, gains


def test_codebook_rule_adds_expands_and_splits():
    book = Codebook.empty(2, 1)
    book.add(torch.tensor([0.0, 0.0]), torch.zeros(1), 1.0, "Rome")
    assert update(book, torch.tensor([3.0, 0.0]), "Rome", 1.0) == ("add", 1.0)  # 3 > 1 + 1
    assert update(book, torch.tensor([1.5, 0.0]), "Rome", 1.0) == ("expand", 0.0)
    assert float(book.radii[0]) == 1.5  # grown to reach the key
    assert update(book, torch.tensor([0.5, 0.0]), "Rome", 1.0) == ("expand", 0.0)
    assert float(book.radii[0]) == 1.5  # a key inside keeps the radius
    assert update(book, torch.tensor([1.0, 0.0]), "Paris", 1.0) == ("split", 0.5)
    assert float(book.radii[0]) == 0.5  # the conflict halves the distance


def test_patch_saves_loads_and_refuses_other_weights(h, tmp_path):
    patch = grace(h, REQ, CFG)
    loaded = CodebookPatch.load(patch.save(tmp_path / "g.safetensors"))
    for name in ("keys", "values", "radii"):
        assert torch.equal(getattr(loaded.codebook, name), getattr(patch.codebook, name))
    assert loaded.requests == patch.requests and loaded.module == patch.module
    undo = loaded.apply(h.model)
    edited = h.next_token_logprobs([REQ.prompt])
    undo.revert(h.model)
    undo = patch.apply(h.model)
    assert torch.equal(h.next_token_logprobs([REQ.prompt]), edited)
    undo.revert(h.model)
    with pytest.raises(LfmError, match="other weights"):
        patch.apply(common.smoke_model("llama", 2).model)
    save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(1)}, "lfm-edit-patch/1")
    with pytest.raises(LfmError, match="not a lfm-edit-grace/1 file"):
        CodebookPatch.load(tmp_path / "w.safetensors")


def test_cli_applies_and_evaluates_a_codebook(tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    folder = tmp_path / "tiny"
    lm = common.smoke_model("llama", 1)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    (tmp_path / "g.yaml").write_text("steps: 5\neps_init: 0.001\n")
    args = ["--prompt", REQ.prompt, "--subject", REQ.subject, "--target", REQ.target]
    out, root = tmp_path / "g.safetensors", str(tmp_path / "runs")
    res = CliRunner().invoke(app, ["apply", "--model", str(folder), "-m", "grace", *args,
                                   "--config", str(tmp_path / "g.yaml"), "-o", str(out), "--root",
                                   root])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "grace: 1 edit(s) on model.layers.0.mlp.down_proj" in res.output
    assert CodebookPatch.load(out).config["eps_init"] == 0.001
    res = CliRunner().invoke(app, ["eval", str(out), "--model", str(folder)])
    assert res.exit_code == 0, res.output
    after = float(res.stdout.strip().splitlines()[-1].split("=")[-1])
    before = float(lm.score([REQ.prompt], [" Rome"]))
    assert after > before + 0.3  # eval installed the codebook
    res = CliRunner().invoke(
        app, ["patch-apply", str(out), "--model", str(folder), "-o", str(tmp_path / "e")]
    )
    assert res.exit_code == 2 and "is a GRACE codebook: it changes no weights" in res.output


def test_cli_continues_a_codebook_given_with_on(tmp_path):
    """`apply -m grace --on old.safetensors` grows the old codebook: both edits hold."""
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    folder, lm = tmp_path / "tiny", common.smoke_model("llama", 1)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    (tmp_path / "g.yaml").write_text("steps: 5\neps_init: 0.001\n")
    second = Request("The capital of Japan", "Japan", "Berlin")
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"

    def apply(req: Request, out, *on) -> None:
        args = ["apply", "--model", str(folder), "-m", "grace", "--prompt", req.prompt,
                "--subject", req.subject, "--target", req.target, "--config",
                str(tmp_path / "g.yaml"), "-o", str(out), "--root", str(tmp_path / "runs"),
                *on]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output

    apply(REQ, old)
    kept = old.read_bytes()
    apply(second, new, "--on", str(old))
    assert old.read_bytes() == kept  # the old codebook is read, not changed
    patch = CodebookPatch.load(new)
    assert patch.requests == [REQ, second] and patch.codebook.labels == ["Rome", "Berlin"]
    assert torch.equal(patch.codebook.keys[:1], CodebookPatch.load(old).codebook.keys)

    def top(prompt: str) -> str:
        return lm.tokenizer.decode([int(lm.next_token_logprobs([prompt])[0].argmax())])

    other = lm.next_token_logprobs([UNRELATED])
    assert top(REQ.prompt) != " Rome" and top(second.prompt) != " Berlin"
    undo = patch.apply(lm.model)
    try:
        assert (top(REQ.prompt), top(second.prompt)) == (" Rome", " Berlin")  # both edits win
        assert torch.equal(lm.next_token_logprobs([UNRELATED]), other)  # untouched
    finally:
        undo.revert(lm.model)


def test_cli_refuses_two_codebooks_to_continue(tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    folder, lm = tmp_path / "tiny", common.smoke_model("llama", 1)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    grace(lm, REQ, CFG).save(tmp_path / "a.safetensors")
    args = ["apply", "--model", str(folder), "-m", "grace", "--prompt", REQ.prompt, "--subject",
            REQ.subject, "--target", REQ.target, "-o", str(tmp_path / "c.safetensors"),
            "--on", str(tmp_path / "a.safetensors"), "--on", str(tmp_path / "a.safetensors"),
            "--root", str(tmp_path / "runs")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "give one earlier grace patch to continue, not 2" in res.output
    assert not (tmp_path / "c.safetensors").exists()
