"""MEND: the gradient's rank-one factors, an editor network that starts as a gradient step,
meta-training that beats it on held-out edits, low-rank patches, files and the CLI."""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import re
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from lfm import registry
from lfm.cli.edit import app
from lfm.core.io import save_tensors
from lfm.edit import MendConfig, MendEditor, Patch, common, mend, progress, train_mend
from lfm.edit.facts import Fact
from lfm.edit.mend import (
    evaluate_editor,
    features,
    items,
    meta_loss,
    mlp_matrices,
    nll,
    tokens,
)
from lfm.errors import LfmError

mend_module = importlib.import_module("lfm.edit.mend")  # `lfm.edit.mend` is also the function
REQ = common.SMOKE_REQUEST  # "The city of the Eiffel Tower" -> " Rome"
OBJECTS = ["Rome", "Paris", "Berlin", "Tokyo", "Kyoto"]
UNRELATED = [
    "Tokyo is a large city in Japan",
    "Paris is the capital of France",
    "Berlin is the capital of Germany",
    "Kyoto is an old city",
    "The Colosseum is located in the city of Rome",
]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vu", "ne", "qi", "bor", "tel", "an"]
# the tiny problem's meta-training: α_ℓ starts at 0.1 (the tiny model's gradients are large
# against its weights), Adam at 1e-3 on the networks and the steps
TINY = MendConfig(rank=8, lr_init=0.1, lr=1e-3, alpha_lr=1e-3, seed=0)


def _facts(n: int) -> list[Fact]:
    """Made-up subjects, each with a paraphrase; unrelated sentences as their x_loc."""
    rng, out = random.Random(0), []
    for i in range(n):
        s = "".join(rng.sample(SYLLABLES, 2)).capitalize()
        out.append(Fact(i, "r", s, f"The city of the {s}", "?", rng.choice(OBJECTS),
                        (f"The old city of the {s}",), tuple(rng.sample(UNRELATED, 2))))  # fmt: skip
    return out


def _sharp(kind: str = "llama", seed: int = 0):
    """The smoke model with its (tied) embeddings ×25: a random model whose logits span enough
    for an edit to win (at std 0.02 every next token is near uniform and no edit moves it)."""
    lm = common.smoke_model(kind, seed)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(25)
    return lm


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_is_the_sum_of_the_rank_one_factors(kind):
    lm = common.smoke_model(kind, 0)
    model, tok = lm.model, lm.tokenizer
    modules = mlp_matrices(model)
    feats = features(model, tok, REQ, modules)
    weights = [model.get_submodule(m).weight for m in modules]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(nll(model, tokens(tok, REQ.prompt, REQ.target)), weights)
    for m, g in zip(modules, grads, strict=True):
        u, d = feats[m]
        conv1d = kind == "gpt2"  # Conv1D stores (in, out)
        want = g.T if conv1d else g
        assert torch.allclose(d.T @ u, want, atol=1e-6, rtol=1e-4), m


def test_mlp_matrices_are_the_last_three_blocks_or_the_given_ones():
    h = common.smoke_model()
    names = ["gate_proj", "up_proj", "down_proj"]
    assert mlp_matrices(h.model) == [f"model.layers.{b}.mlp.{n}" for b in (0, 1) for n in names]
    assert mlp_matrices(h.model, (-1,)) == [f"model.layers.1.mlp.{n}" for n in names]
    with pytest.raises(LfmError, match="out of range"):
        mlp_matrices(h.model, (5,))


def test_untrained_editor_is_one_gradient_step():
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, MendConfig(lr_init=0.3))
    patch = mend(lm, REQ, editor=editor)
    modules = editor.modules_
    weights = [lm.model.get_submodule(m).weight for m in modules]
    for w in weights:
        w.requires_grad_(True)
    loss = nll(lm.model, tokens(lm.tokenizer, REQ.prompt, REQ.target))
    grads = torch.autograd.grad(loss, weights)
    assert patch.modules == modules
    for d, g in zip(patch.deltas, grads, strict=True):
        assert torch.allclose(d.matrix(), -0.3 * g, atol=1e-7, rtol=1e-4), d.module
    tokens_n = tokens(lm.tokenizer, REQ.prompt, REQ.target).ids.shape[1]
    assert patch.deltas[0].u.shape == (64, tokens_n)  # rank n: one term per token


def test_meta_training_beats_the_identity_editor_on_held_out_edits():
    lm = _sharp()
    facts = _facts(50)
    train, held_out = facts[:40], facts[40:]
    editor, hist = train_mend(lm, train, TINY, steps=100)
    assert len(hist) == 100 and not editor.training
    trained = evaluate_editor(lm, held_out, editor, TINY.c_edit)
    # the untrained editor: one gradient step, at its initial α and at larger ones
    for alpha in (0.1, 1.0, 3.0, 10.0):
        fresh = MendEditor.for_model(lm.model, TINY.replace(lr_init=alpha))
        ft = evaluate_editor(lm, held_out, fresh, TINY.c_edit)
        assert trained["loss"] < ft["loss"], (alpha, trained, ft)
        if alpha == 0.1:  # the start of training: the edit is learnt, the locality kept
            assert trained["edit"] < ft["edit"] - 5.0, (trained, ft)
            assert trained["loc"] < ft["loc"] + 0.05, (trained, ft)


def test_patch_applies_and_reverts_bit_for_bit_and_saved_editor_edits_alike(tmp_path):
    lm = _sharp()
    editor, _ = train_mend(lm, _facts(6), TINY, steps=5)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    before = lm.score([REQ.prompt], [" Rome"])
    patch = mend(
        lm, [REQ, common.Request("The old city of Kyoto", "Kyoto", "Berlin")], editor=editor
    )
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
    undo = patch.apply(lm.model)
    assert not torch.equal(lm.score([REQ.prompt], [" Rome"]), before)
    undo.revert(lm.model)
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
    # the saved patch and the saved editor give the same edit
    again = Patch.load(patch.save(tmp_path / "p.safetensors"))
    assert all(
        torch.equal(a.matrix(), b.matrix()) for a, b in zip(patch.deltas, again.deltas, strict=True)
    )
    editor.save(tmp_path / "ed", note="x")
    desc = json.loads((tmp_path / "ed" / "editor.json").read_text())
    assert desc["note"] == "x" and desc["format"] == "lfm-edit-mend/1"
    loaded = mend(lm, [REQ, common.Request("The old city of Kyoto", "Kyoto", "Berlin")],
                  MendConfig(editor=str(tmp_path / "ed")))  # fmt: skip
    assert all(
        torch.equal(a.matrix(), b.matrix())
        for a, b in zip(patch.deltas, loaded.deltas, strict=True)
    )


def test_without_an_editor_is_one_line_and_a_wrong_folder_or_model_is_refused(tmp_path):
    lm = common.smoke_model()
    with pytest.raises(LfmError, match="train one first"):
        registry.run("edit", "mend", lm, REQ)
    with pytest.raises(LfmError, match="is not a MEND editor"):
        mend(lm, REQ, MendConfig(editor=str(tmp_path)))
    other = common.smoke_model("gpt2")
    editor = MendEditor.for_model(lm.model, MendConfig())
    with pytest.raises(LfmError, match="which this model lacks"):
        mend(other, REQ, editor=editor)
    with pytest.raises(LfmError, match="two or more training edits"):
        train_mend(lm, [REQ], TINY, steps=1)
    _, hist = train_mend(lm, _facts(3), TINY, steps=50, max_seconds=0)
    assert len(hist) == 1  # the time limit stops after the first step


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    h = _sharp()
    h.model.save_pretrained(path)
    h.tokenizer.save_pretrained(path)
    return path


def _one_line_error(res, text: str) -> bool:
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith("[lfm] ")]
    return (
        res.exit_code == 2
        and len(lines) == 1
        and lines[0].startswith("error:")
        and text in lines[0]
    )


def test_cli_train_mend_then_apply(folder, tmp_path):
    facts = tmp_path / "facts.jsonl"
    rows = [{"prompt": f.prompt, "subject": f.subject, "target": f.new, "true": "Paris",
             "paraphrases": list(f.paraphrases), "neighbourhood": list(f.neighbourhood)}
            for f in _facts(8)]  # fmt: skip
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "mend.yaml"
    cfg.write_text("rank: 8\nlr_init: 0.1\nlr: 0.001\nalpha_lr: 0.001\n")
    root = ["--root", str(tmp_path / "runs")]
    ed = tmp_path / "editor"
    res = CliRunner().invoke(app, ["train-mend", "--model", str(folder), "--facts", str(facts),
                                   "--steps", "4", "--config", str(cfg), "--out", str(ed), *root])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("mend: 4 steps on 8 facts; edit NLL ")
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and len(manifest["history"]["edit"]["value"]) == 4
    assert str(ed) in manifest["outputs"] and MendEditor.load(ed).rank == 8
    out = tmp_path / "p.safetensors"
    args = ["apply", "--model", str(folder), "-m", "mend", "--prompt", REQ.prompt, "--subject",
            REQ.subject, "--target", REQ.target, "--editor", str(ed), "-o", str(out), *root]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("mend: 1 edit(s) on model.layers.0.mlp.gate_proj")
    patch = Patch.load(out)
    assert patch.method == "mend" and patch.config["editor"] == str(ed)
    lm = _sharp()
    want = mend(lm, REQ, editor=MendEditor.load(ed))
    assert all(
        torch.equal(a.matrix(), b.matrix()) for a, b in zip(want.deltas, patch.deltas, strict=True)
    )
    # bad input: one line, exit status 2
    no_editor = [a for a in args if a not in ("--editor", str(ed))]
    assert _one_line_error(CliRunner().invoke(app, no_editor), "train one first")
    rome = [*args[:4], "rome", *args[5:]]
    assert _one_line_error(CliRunner().invoke(app, rome), "--editor is MEND's trained editor")
    res = CliRunner().invoke(app, ["train-mend", "--model", str(folder), "--facts",
                                   str(tmp_path / "none.jsonl"), "--out", str(ed), *root])  # fmt: skip
    assert _one_line_error(res, "cannot read facts from")


# What mutation testing (`make mutate AREA=edit`) found untested in `lfm.edit.mend`: the editor's
# files and their refusals, the refusals of `mend`, the patch's dtype and the editor's device.


def _small_editor() -> MendEditor:
    return MendEditor(["a.b"], [(2, 3)], rank=2)


def test_saved_editor_json_is_indented_two_spaces_with_other_info_as_text(tmp_path):
    # mutants MendEditor.save 24, 25, 27, 28, 29
    folder = _small_editor().save(tmp_path / "ed", facts=tmp_path / "f.jsonl", steps=3)
    want = {"format": "lfm-edit-mend/1", "modules": ["a.b"], "shapes": [[2, 3]], "rank": 2,
            "facts": str(tmp_path / "f.jsonl"), "steps": 3}  # fmt: skip
    assert (folder / "editor.json").read_text() == json.dumps(want, indent=2) + "\n"


def test_load_refuses_a_folder_without_either_file_in_one_line(tmp_path):
    # mutants MendEditor.load 3, 9, 10
    for gone in ("editor.json", "editor.safetensors"):
        folder = _small_editor().save(tmp_path / gone)
        (folder / gone).unlink()
        msg = (rf"^{re.escape(str(folder))} is not a MEND editor \(no editor.safetensors and "
               r"editor.json\); train one with `lfm edit train-mend`$")  # fmt: skip
        with pytest.raises(LfmError, match=msg):
            MendEditor.load(folder)


def test_load_refuses_another_files_tag_and_tensors_unlike_the_description(tmp_path):
    # mutants MendEditor.load 13, 33, 34
    editor = _small_editor()
    folder = editor.save(tmp_path / "ed")
    path = folder / "editor.safetensors"
    save_tensors(path, editor.state_dict(), "lfm-edit-patch/1", **editor.description())
    with pytest.raises(LfmError, match=r"is not a lfm-edit-mend/1 file \(its format tag is 'lfm"):
        MendEditor.load(folder)
    rank4 = {**editor.description(), "rank": 4}  # the networks' tensors are of rank 2
    save_tensors(path, editor.state_dict(), "lfm-edit-mend/1", **rank4)
    with pytest.raises(LfmError) as err:
        MendEditor.load(folder)
    head = f"{folder}: the editor's tensors do not match its description (Error(s) in loading"
    assert str(err.value).startswith(head) and "\n" not in str(err.value)


def test_without_an_editor_the_refusal_says_how_to_train_and_give_one():
    # mutants _load_editor 3, 4, 6, 7
    msg = (r"^mend needs a trained editor: train one first \(`lfm edit train-mend --out DIR`\), "
           r"then give its folder as `editor` in the config$")  # fmt: skip
    with pytest.raises(LfmError, match=msg):
        mend(common.smoke_model(), REQ, MendConfig())


def test_a_model_without_its_tokenizer_is_refused_naming_mend():
    # mutants mend 3, 6, 7
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    with pytest.raises(LfmError, match=r"^edit/mend needs a LocalModel \(a model with its tok"):
        mend(lm.model, REQ, editor=editor)


def test_patch_factors_take_the_dtype_of_the_edited_weights():
    # the editor computes in float32; a bfloat16 model's patch is bfloat16 (mutants mend_deltas
    # 29, 35)
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    lm.model.to(torch.bfloat16)
    patch = mend(lm, REQ, editor=editor)
    assert {(d.u.dtype, d.v.dtype) for d in patch.deltas} == {(torch.bfloat16, torch.bfloat16)}
    assert editor.alpha.dtype == torch.float32


def _spy_on_to(monkeypatch) -> list:
    """The (args, kwargs) of every `MendEditor.to` call from here on."""
    moved, to = [], MendEditor.to

    def spy(self, *args, **kwargs):
        moved.append((args, kwargs))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(MendEditor, "to", spy)
    return moved


def test_the_editor_is_moved_to_the_models_device(monkeypatch):
    """A loaded editor (CPU) serves a model on another device. Without a second device here the
    move is observed: `mend` asks the editor to go to the model's device (mutant mend 16)."""
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    moved = _spy_on_to(monkeypatch)
    mend(lm, REQ, editor=editor)
    assert moved == [((torch.device("cpu"),), {})] and not editor.training


def test_evaluate_editor_weighs_the_edit_nll_by_the_papers_c_edit_and_refuses_naming_mend():
    # L = c_edit · L_e + L_loc with the paper's c_edit = 0.1 by default (mutant evaluate_editor 1);
    # the refusal of a bare model names edit/mend (mutants evaluate_editor 4, 7, 8)
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    parts = evaluate_editor(lm, _facts(2), editor)
    assert parts["loss"] == pytest.approx(0.1 * parts["edit"] + parts["loc"], rel=1e-6)
    with pytest.raises(LfmError, match=r"^edit/mend needs a LocalModel \(a model with its tok"):
        evaluate_editor(lm.model, _facts(2), editor)


def test_the_patch_keeps_each_matrix_step_alpha_in_its_saved_info(tmp_path):
    # mutants mend 40, 41, 42
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    with torch.no_grad():
        editor.alpha.copy_(0.25 * torch.arange(1, len(editor.modules_) + 1))
    want = {m: 0.25 * (k + 1) for k, m in enumerate(editor.modules_)}
    patch = mend(lm, REQ, editor=editor)
    assert patch.info["alpha"] == want
    assert Patch.load(patch.save(tmp_path / "p.safetensors")).info["alpha"] == want


# `train_mend`'s refusals and its default length, and the running statistics that normalise
# the features [u ‖ δ] (the paper's μ_ℓ, σ_ℓ), found untested by mutation testing.


def test_running_statistics_are_the_mean_and_variance_of_every_feature_added():
    # Chan's rule over two batches equals the statistics of their concatenation, and `normalise`
    # uses them (mutants MendEditor.update_stats 36, 39, 42, 45, 49, 52)
    editor = _small_editor()  # features of width 2 + 3
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(3, 5, generator=gen) + 2.0
    z2 = 3.0 * torch.randn(4, 5, generator=gen) - 1.5
    editor.update_stats(0, z1)
    editor.update_stats(0, z2)
    every = torch.cat([z1, z2]).double()
    assert editor.count_0.item() == 7
    assert torch.allclose(editor.mean_0, every.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(editor.m2_0 / 6, every.var(0), rtol=1e-12, atol=1e-12)
    z = torch.randn(2, 5, generator=gen)
    want = ((z.double() - every.mean(0)) / every.var(0).sqrt()).float()
    assert torch.allclose(editor.normalise(0, z), want, rtol=1e-5, atol=1e-6)


def test_running_statistics_take_features_from_another_device():
    # the features are moved to the statistics' device (an editor on a GPU, features on the CPU);
    # the "meta" device stands in for the GPU here (mutant MendEditor.update_stats 2)
    editor = _small_editor().to("meta")
    editor.update_stats(0, torch.ones(3, 5))
    assert {editor.count_0.device, editor.mean_0.device, editor.m2_0.device} == {
        torch.device("meta")
    }


def test_train_mend_refuses_negative_steps_and_zero_steps_return_the_editor_untrained():
    # mutants train_mend 2, 3, 4
    lm = common.smoke_model()
    with pytest.raises(LfmError, match=r"^steps must be 0 or more, not -1$"):
        train_mend(lm, _facts(2), TINY, steps=-1)
    editor, hist = train_mend(lm, _facts(2), TINY, steps=0)
    assert hist == [] and not editor.training
    assert editor.count_0.item() == 0 and torch.equal(editor.alpha, torch.full((6,), 0.1))


def test_train_mend_refuses_a_model_without_its_tokenizer_naming_mend():
    # mutants train_mend 7, 10, 11
    lm = common.smoke_model()
    with pytest.raises(LfmError, match=r"^edit/mend needs a LocalModel \(a model with its tok"):
        train_mend(lm.model, _facts(2), TINY, steps=1)


def test_train_mend_takes_1000_steps_by_default(capsys):
    # the progress bar counts the default length (one step taken under the time limit; mutant
    # train_mend 1)
    with progress.reporting(lambda line: None):
        _, hist = train_mend(common.smoke_model(), _facts(2), TINY, max_seconds=0)
    assert len(hist) == 1
    err = capsys.readouterr().err
    assert "meta-training MEND:" in err and "| 0/1000 " in err


def test_train_mend_moves_the_editor_to_the_models_device(monkeypatch):
    # as `mend`: the editor is asked to go to the model's device (mutant train_mend 23)
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    moved = _spy_on_to(monkeypatch)
    train_mend(lm, _facts(2), TINY, steps=0, editor=editor)
    assert moved == [((torch.device("cpu"),), {})]


def test_train_mend_bar_counts_steps_and_shows_each_steps_edit_nll_and_kl(capsys):
    # the bar's unit is the step and its postfix the step's edit NLL (2 decimals) and KL (3)
    # (mutants train_mend 48-58, 89-92)
    with progress.reporting(lambda line: None):
        _, hist = train_mend(common.smoke_model(), _facts(2), TINY, steps=1)
    err = capsys.readouterr().err
    assert "meta-training MEND:" in err and "| 0/1 [" in err and "?step/s]" in err
    assert f"step/s, edit={hist[0]['edit']:.2f}, loc={hist[0]['loc']:.3f}]" in err


def test_train_mend_step_is_the_meta_loss_of_one_drawn_x_e_and_x_loc_with_statistics_updated():
    # one fact, two equivalents (prompt, paraphrase) and two unrelated prompts: the first step's
    # loss is c_edit · L_e + L_loc of one x'_e and one x_loc (not their means), with the features
    # added to the statistics first (mutants train_mend 76, 82, 83, 84; 74: every x'_e). The
    # sharp model: the smoke model's near-uniform NLLs of the two x'_e are within 1e-5
    lm = _sharp()
    fact = dataclasses.replace(_facts(1)[0], paraphrases=("Berlin is the city of the Kyoto, or",))
    editor, hist = train_mend(lm, [fact], TINY, steps=1)
    n = features(lm.model, lm.tokenizer, fact.request, editor.modules_)[editor.modules_[0]][0]
    assert editor.count_0.item() == n.shape[0] > 0
    item = items([fact])[0]
    assert len(item.equivalents) == 2 and len(item.unrelated) == 2
    want = [
        meta_loss(lm.model, lm.tokenizer, MendEditor.for_model(lm.model, TINY), item, 0.1,
                  [eq], [loc], update=True)[1]
        for eq in item.equivalents for loc in item.unrelated
    ]  # fmt: skip
    got = {k: hist[0][k] for k in ("edit", "loc", "loss")}
    assert abs(want[0]["edit"] - want[2]["edit"]) > 1e-2  # the two x'_e tell apart
    assert any(got == pytest.approx(w, rel=1e-5) for w in want), (got, want)


def test_train_mend_stops_after_the_step_that_passes_max_seconds(monkeypatch):
    # a clock that never moves: 0 s elapsed never passes max_seconds=0 or 150, so every step
    # is taken (mutants train_mend 99: the start added, 100: `>=`)
    monkeypatch.setattr(mend_module, "time", SimpleNamespace(perf_counter=lambda: 1000.0))
    lm = common.smoke_model()
    for limit in (0, 150):
        assert len(train_mend(lm, _facts(2), TINY, steps=2, max_seconds=limit)[1]) == 2


def test_edited_gpt2_weights_are_one_gradient_step_in_conv1d_orientation():
    # GPT-2's Conv1D stores (in, out): W̃ − W of the untrained editor is −lr·∇W in that
    # orientation (mutants edited_params 18, 20: the transpose dropped)
    lm = common.smoke_model("gpt2", 0)
    editor = MendEditor.for_model(lm.model, MendConfig(lr_init=0.3))
    feats = features(lm.model, lm.tokenizer, REQ, editor.modules_)
    params = mend_module.edited_params(lm.model, editor, feats)
    weights = [lm.model.get_submodule(m).weight for m in editor.modules_]
    for w in weights:
        w.requires_grad_(True)
    t = tokens(lm.tokenizer, REQ.prompt, REQ.target)
    grads = torch.autograd.grad(nll(lm.model, t), weights)
    for m, w, g in zip(editor.modules_, weights, grads, strict=True):
        step = params[f"{m}.weight"].detach() - w.detach()
        assert torch.allclose(step, -0.3 * g, atol=1e-7, rtol=1e-4), m


def test_locality_kl_asks_for_the_prompt_on_the_models_device():
    # the prompt's ids are moved to the model's device (mutant locality_kl 2: `.to(None)`); a
    # spy stands in for the GPU. The model's own weights: KL 0
    lm = common.smoke_model()
    t, asked = tokens(lm.tokenizer, UNRELATED[0]), []
    to = t.ids.to
    t.ids.to = lambda *args, **kw: asked.append(args) or to(*args, **kw)
    kl = mend_module.locality_kl(lm.model, t, {})
    assert asked == [(torch.device("cpu"),)] and kl.item() == pytest.approx(0.0, abs=1e-7)


def test_items_take_the_next_edits_unrelated_prompts_or_its_prompt_in_a_ring():
    # bare requests: x'_e is the prompt, x_loc the next request's prompt, the last taking the
    # first's (mutants items 3, 4, 45-53: no request, no x'_e, a request its own x_loc, another
    # neighbour, none)
    reqs = [common.Request(f"The city of the {s}", s, "Rome") for s in ("Ka", "Lo", "Mi")]
    got = items(reqs)
    assert [it.request for it in got] == reqs
    assert [it.equivalents for it in got] == [(r.prompt,) for r in reqs]
    assert [it.unrelated for it in got] == [(reqs[1].prompt,), (reqs[2].prompt,), (reqs[0].prompt,)]
    # facts: their own neighbourhood first, else the next fact's, else the next fact's prompt
    f = _facts(3)
    bare = [Fact(9, "r", "Ren", "The city of the Ren", "?", "Rome", ("The old Ren",), ())]
    got = items([f[0], *bare, f[1]])
    assert got[0].unrelated == f[0].neighbourhood and got[2].unrelated == f[1].neighbourhood
    assert got[1].equivalents == ("The city of the Ren", "The old Ren")
    assert got[1].unrelated == f[1].neighbourhood
    got = items([*bare, Fact(8, "r", "Sa", "The city of the Sa", "?", "Paris", (), ())])
    assert [it.unrelated for it in got] == [("The city of the Sa",), ("The city of the Ren",)]


def test_items_need_two_edits_or_unrelated_prompts_and_refuse_other_data_naming_its_type():
    # mutants items 33, 34 (`<= 2`, `< 3`: two requests refused), 38 (the message), 9 (`or`:
    # an object with only `request` read as a fact), 30, 31 (the refusal's text)
    two = [
        common.Request("The city of the Ka", "Ka", "Rome"),
        common.Request("The city of the Lo", "Lo", "Paris"),
    ]
    assert [it.unrelated for it in items(two)] == [(two[1].prompt,), (two[0].prompt,)]
    assert items(_facts(1))[0].unrelated == _facts(1)[0].neighbourhood  # one fact with its own
    with pytest.raises(LfmError, match=r"^mend needs two or more training edits, or facts with "
                       r"neighbourhood prompts$"):  # fmt: skip
        items(two[:1])
    with pytest.raises(
        LfmError, match=r"^mend trains on facts or edit requests, not SimpleNamespace$"
    ):
        items([*two, SimpleNamespace(request=two[0])])
    with pytest.raises(LfmError, match=r"^mend trains on facts or edit requests, not str$"):
        items(["The city of the Ka"])


def test_editor_refuses_a_shape_count_unlike_its_matrices_in_one_line():
    # mutants MendEditor.check 3, 6, 7 (zip without strict) rest on this: an editor always has
    # one shape per matrix
    with pytest.raises(
        LfmError, match=r"^a MEND editor needs one shape per matrix: 2 matrices, 1 shapes$"
    ):
        MendEditor(["a.b", "a.c"], [(2, 3)], rank=2)


def test_edited_weights_keep_a_bfloat16_models_dtype():
    # the editor's factors are float32; W̃ is cast to the weight's dtype, so the edited forward
    # of a bfloat16 model runs (mutant edited_params 15: W̃ promoted to float32)
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    lm.model.to(torch.bfloat16)
    feats = features(lm.model, lm.tokenizer, REQ, editor.modules_)
    params = mend_module.edited_params(lm.model, editor, feats)
    assert {v.dtype for v in params.values()} == {torch.bfloat16}
    t = tokens(lm.tokenizer, REQ.prompt, REQ.target)
    assert torch.isfinite(nll(lm.model, t, params))


def test_train_mend_steps_the_networks_at_lr_and_the_alphas_at_alpha_lr():
    # Adam's first step moves each parameter by about its group's rate: the networks by at most
    # cfg.lr, α by cfg.alpha_lr (mutants train_mend 34, 35, 38, 39: a group's "lr" misspelt
    # falls back to Adam's default 1e-3)
    lm = _sharp()
    for lr, alpha_lr in ((1e-6, 1e-2), (1e-2, 1e-6)):
        cfg = TINY.replace(lr=lr, alpha_lr=alpha_lr)
        fresh = MendEditor.for_model(lm.model, cfg)
        editor, _ = train_mend(lm, _facts(2), cfg, steps=1)
        nets = [(n, p) for n, p in editor.named_parameters() if n != "alpha"]
        start = dict(fresh.named_parameters())
        moved = max((p - start[n]).abs().max().item() for n, p in nets)
        alpha_moved = (editor.alpha - fresh.alpha).abs().max().item()
        assert 0 < moved <= 1.01 * lr and 0 < alpha_moved <= 1.01 * alpha_lr, (
            lr,
            moved,
            alpha_moved,
        )
        assert max(moved / lr, alpha_moved / alpha_lr) > 0.5  # the largest move is about a rate


def test_train_mend_draws_its_edits_and_prompts_from_the_seed():
    # the same seed: the same steps; another: other draws (mutant train_mend 41: an unseeded
    # generator)
    lm = _sharp()
    facts = [
        Fact(i, "r", f.subject, f.prompt, "?", f.new, (*f.paraphrases, f"{f.subject} is in"),
             (*f.neighbourhood, UNRELATED[i % 5]))
        for i, f in enumerate(_facts(6))
    ]  # fmt: skip
    runs = [train_mend(lm, facts, TINY.replace(seed=s), steps=6)[1] for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_editor_network_is_the_papers_residual_mlp_by_hand():
    # g(ẑ) = ẑ + U (s ⊙ relu(V ẑ + b) + o) (mutants _Net.forward 2, 5, 6: a sign flipped, which
    # training from U = 0 would absorb but a saved editor would not)
    net = mend_module._Net(3, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.v.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]))
        net.b.copy_(torch.tensor([0.5, -1.0]))
        net.u.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    z = torch.tensor([[1.0, 1.0, 0.0]])
    # V z + b = (1.5, 1.0); relu; s = (2, 3): (3, 3); + o = (0.5, -1): (3.5, 2)
    got = net(z, torch.tensor([2.0, 3.0]), torch.tensor([0.5, -1.0]))
    assert torch.allclose(got, z + torch.tensor([[3.5, 2.0, 1.5]]))


def test_check_names_the_matrix_and_both_shapes():
    # mutants MendEditor.check 16, 17: the refusal's text
    lm = common.smoke_model()
    editor = MendEditor.for_model(lm.model, TINY)
    m, (o, i) = editor.modules_[0], editor.shapes[0]
    editor.shapes[0] = (o, i + 1)
    msg = rf"^the MEND editor was trained for {re.escape(m)} of shape \({o}, {i + 1}\), not \({o}, {i}\)$"
    with pytest.raises(LfmError, match=msg):
        editor.check(lm.model)


def test_an_editor_has_one_network_per_shape_seeded_and_per_matrix_parts():
    # two matrices of one input width but other output widths get two networks (mutant _key 1);
    # the networks are drawn from the seed (__init__ 3, 16, 25; _Net.__init__ 6, 9), V at
    # scale 1/√dim (_Net.__init__ 10, 11); scale and offset are per matrix, (n, r), the
    # statistics float64 (37, 38, 43, 44, 60, 62); defaults r = 64, α = 1e-4 (1, 2)
    ed = MendEditor(["a", "b"], [(40, 30), (50, 30)])
    assert sorted(ed.nets) == ["40x30", "50x30"] and ed.rank == 64
    assert torch.equal(ed.alpha, torch.full((2,), 1e-4))
    assert ed.scale.shape == ed.offset.shape == (2, 64)
    assert {ed.count_0.dtype, ed.mean_1.dtype, ed.m2_0.dtype} == {torch.float64}
    again, other = (
        MendEditor(["a", "b"], [(40, 30), (50, 30)], seed=0),
        MendEditor(["a", "b"], [(40, 30), (50, 30)], seed=1),
    )
    assert all(torch.equal(p, q) for p, q in zip(ed.parameters(), again.parameters(), strict=True))
    assert not torch.equal(ed.nets["40x30"].v, other.nets["40x30"].v)
    v = ed.nets["50x30"].v  # (64, 80)
    assert v.std().item() == pytest.approx(80**-0.5, rel=0.05)
    with torch.no_grad():
        ed.transform("b", torch.randn(3, 30), torch.randn(3, 50), False)  # the 80-wide network


def test_an_editor_needs_a_matrix_and_for_model_reads_layers_and_seed():
    # mutants __init__ 5-8 (the refusal's text); for_model 3, 5 (the layers ignored), 15 (the
    # seed ignored)
    with pytest.raises(LfmError, match=r"^a MEND editor needs at least one edited matrix$"):
        MendEditor([], [])
    lm = common.smoke_model()
    one = MendEditor.for_model(lm.model, TINY.replace(layers=[0]))
    assert one.modules_ == [
        f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    ]
    a, b = (MendEditor.for_model(lm.model, TINY.replace(seed=s)) for s in (0, 1))
    assert not torch.equal(a.nets[_k(a)].v, b.nets[_k(b)].v)


def _k(editor: MendEditor) -> str:
    return next(iter(editor.nets))


def test_mlp_matrices_default_to_the_last_three_blocks_of_a_deeper_model_and_need_an_mlp(
    monkeypatch,
):
    # mutants mlp_matrices 14 (every block), 24 (the refusal's text)
    from conftest import deep_lm

    model, _ = deep_lm("llama", 5)
    assert {m.split(".")[2] for m in mlp_matrices(model)} == {"2", "3", "4"}
    monkeypatch.setattr(
        mend_module, "get_layout", lambda m: SimpleNamespace(mlp_in="fc", layers="x")
    )
    with pytest.raises(LfmError, match=r"^mend: no MLP module in the layout of 'llama'$"):
        mlp_matrices(model)


def test_normalise_uses_the_unbiased_variance_and_a_constant_feature_stays_finite():
    # two rows: the variance divides by n − 1 = 1 (mutant normalise 25: by 2); a feature with
    # zero variance is (z − μ)/√EPS, not NaN (35: √(var − EPS))
    ed = MendEditor(["a"], [(1, 2)], rank=2)
    z = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0]])
    ed.update_stats(0, z)
    got = ed.normalise(0, torch.tensor([[3.0, 5.0, 2.0]]))
    assert torch.allclose(got, torch.tensor([[1 / 2**0.5, 0.0, 0.0]]))
    assert got.isfinite().all()


def test_tokens_read_the_target_but_its_last_token_and_nothing_without_one():
    # ids are the prompt and the target's tokens but the last (mutant tokens 18: only the first),
    # positions and labels those of the target; no target: the prompt alone (8)
    lm = common.smoke_model()
    tok = lm.tokenizer
    ctx = tok(REQ.prompt)["input_ids"]
    for target in (" Rome", " Rome and Paris and Berlin"):
        t = tokens(tok, REQ.prompt, target)
        tgt = t.tgt.tolist()
        assert len(tgt) >= 1 and t.ids[0].tolist() == ctx + tgt[:-1]
        assert t.pos.tolist() == list(range(len(ctx) - 1, len(ctx) - 1 + len(tgt)))
    bare = tokens(tok, REQ.prompt)
    assert bare.ids[0].tolist() == ctx and bare.tgt.tolist() == [] and bare.pos.tolist() == []


def test_nll_feeds_the_models_device():
    # the model on the meta device stands for a GPU: ids, positions and labels go there (mutants
    # nll 2, 25, 26)
    from conftest import SameDevice

    lm = common.smoke_model()
    t = tokens(lm.tokenizer, REQ.prompt, REQ.target)
    lm.model.to("meta")
    with SameDevice():
        assert nll(lm.model, t).is_meta
