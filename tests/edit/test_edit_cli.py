"""`lfm edit`: the commands are thin over `lfm.edit.recipes` and print one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lfm.cli.edit import app
from lfm.core.runs import Run, path_sha256
from lfm.edit import FTLConfig, MemoryPatch, Patch, common, recipes
from lfm.errors import LfmError

REQ = common.SMOKE_REQUEST
ARGS = ["--prompt", REQ.prompt, "--subject", REQ.subject, "--target", REQ.target]


def _manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _one_line_error(res, text: str) -> bool:
    """Exit status 2 and one error line; besides it only progress lines (`[lfm] ...`)."""
    lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith("[lfm] ")]
    return (
        res.exit_code == 2
        and len(lines) == 1
        and lines[0].startswith("error:")
        and (text in lines[0])
    )


@pytest.fixture(scope="module")
def folder(smoke_folder):
    return smoke_folder


def test_apply_without_a_request_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(
        app, ["apply", "--model", "no-such-model", "--out", str(tmp_path / "p.st")]
    )
    assert _one_line_error(res, "give --prompt, --subject and --target")


def test_unknown_method_is_refused(tmp_path):
    args = ["apply", "--model", "m", "-m", "teleport", "--prompt", "A is", "--subject", "A",
            "--target", "B"]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p.st")])
    assert _one_line_error(res, "no method 'edit/teleport'")


def test_state_is_only_for_alphaedit(folder, tmp_path):
    args = ["apply", "--model", str(folder), "-m", "rome", *ARGS, "--state", str(tmp_path / "s")]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p.st")])
    assert _one_line_error(
        res, "--state is for the lifelong editors (alphaedit, ultraedit, wise); rome keeps no state"
    )


def test_patch_revert_needs_an_edited_folder(tmp_path):
    (tmp_path / "m").mkdir()
    res = CliRunner().invoke(app, ["patch-revert", str(tmp_path / "m"), "--out",
                                   str(tmp_path / "o"), "--root", str(tmp_path / "runs")])  # fmt: skip
    assert _one_line_error(res, "edit-undo.safetensors")
    (run,) = (tmp_path / "runs").iterdir()
    assert _manifest(run)["status"].startswith("failed: ") and not (tmp_path / "o").exists()


def test_ike_patch_is_json_and_eval_applies_it(folder, tmp_path):
    out, root = tmp_path / "ike.json", ["--root", str(tmp_path / "runs")]
    cfg = tmp_path / "ike.yaml"  # two demonstrations, retrieved without the encoder asset
    cfg.write_text("k: 2\nencoder: chars\n")
    args = ["apply", "--model", str(folder), "-m", "ike", *ARGS, "--config", str(cfg), "-o",
            str(out), *root]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    assert res.stdout.strip().splitlines() == [f"ike: 1 edit(s) on the context -> {out}",
                                               f"run: {run}"]  # fmt: skip
    assert json.loads(out.read_text())["requests"] == [REQ.to_dict()]
    res = CliRunner().invoke(
        app, ["eval", str(out), "--model", str(folder), "--max-new-tokens", "3"]
    )
    assert res.exit_code == 0, res.output
    first, last = res.stdout.strip().splitlines()
    assert json.loads(first)["prompt"] == REQ.prompt and last.startswith("log P('Rome'")
    # the memory patch's score is the model's score with the demonstrations and the fact in context
    h = common.smoke_model()
    context = MemoryPatch.load(out).apply(h).context(REQ.prompt)
    assert context.count("New Fact: ") == 3 and context.endswith(f"{REQ.prompt} Rome\nPrompt: ")
    want = h.score([context + REQ.prompt], [" Rome"]).item()
    assert last.endswith(f"= {want:.3f}")
    res = CliRunner().invoke(
        app, ["patch-apply", str(out), "--model", str(folder), "-o", str(tmp_path / "e"), *root]
    )
    assert _one_line_error(res, "is a memory patch: it changes no weights")


def test_ft_l_by_either_spelling_then_patch_apply_and_revert_bit_for_bit(folder, tmp_path):
    cfg = tmp_path / "ftl.yaml"
    cfg.write_text("steps: 3\nlr: 0.03\nnorm_constraint: 1.0\n")
    patches, root = [], ["--root", str(tmp_path / "runs")]
    for name in ("ft-l", "ft_l"):
        out = tmp_path / f"{name}.safetensors"
        args = ["apply", "--model", str(folder), "-m", name, *ARGS, "--config", str(cfg), "-o",
                str(out),
                *root]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert res.stdout.startswith("ft_l: 1 edit(s) on model.layers.0.mlp.down_proj")
        patches.append(Patch.load(out))
    assert torch.equal(patches[0].deltas[0].matrix(), patches[1].deltas[0].matrix())
    edited, restored = tmp_path / "edited", tmp_path / "restored"
    res = CliRunner().invoke(
        app, ["patch-apply", str(out), "--model", str(folder), "-o", str(edited), *root]
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["patch-revert", str(edited), "-o", str(restored), *root])
    assert res.exit_code == 0, res.output
    from lfm.assets import load_model

    base, back = load_model(str(folder)).model, load_model(str(restored)).model
    ed = load_model(str(edited)).model
    name = "model.layers.0.mlp.down_proj.weight"
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in base.state_dict().items())
    moved = ed.state_dict()[name] - base.state_dict()[name]  # (W + ΔW) − W: ΔW up to rounding
    assert torch.allclose(moved, patches[1].deltas[0].dense, atol=1e-6) and moved.abs().max() > 0.01


def test_recipes_run_from_python(tmp_path):
    runs = tmp_path / "runs"
    h = common.smoke_model()
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    cfg = FTLConfig(steps=3, lr=0.03, norm_constraint=1.0)
    done = recipes.apply(h, "ft_l", [REQ], tmp_path / "p.safetensors", config=cfg, root=runs)
    assert (done.method, done.edits, done.state) == ("ft_l", 1, None)
    assert isinstance(recipes.load_patch(done.path), Patch)
    # an earlier patch is applied for the edit and reverted after it
    again = recipes.apply(h, "ft_l", REQ, tmp_path / "q.safetensors", config=cfg,
                          on=[done.path], root=runs)  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    assert Patch.load(again.path).base != Patch.load(done.path).base  # made on the edited weights
    report = recipes.evaluate(h, done.path, ["The city of the"], max_new_tokens=2)
    assert [r["prompt"] for r in report.completions] == ["The city of the"]
    assert report.logprobs[0][0] == REQ and report.logprobs[0][1] < 0
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    memory = recipes.apply(h, "ike", REQ, tmp_path / "m.json", root=runs)
    assert isinstance(recipes.load_patch(memory.path), MemoryPatch)
    with pytest.raises(LfmError, match="--on takes weight patches"):
        recipes.apply(h, "ft_l", REQ, tmp_path / "r.safetensors", on=[memory.path], root=runs)
    with pytest.raises(LfmError, match="FTLConfig: steps"):
        recipes.apply(h, "ft_l", REQ, tmp_path / "r.safetensors", config={"steps": "many"},
                      root=runs)  # fmt: skip


def test_apply_writes_a_run_with_input_hashes_and_lineage(folder, tmp_path):
    runs = tmp_path / "runs"
    made = Run("make-model", {}, root=runs)  # the model is an output of an earlier run
    with made.output("model") as tmp:
        shutil.copytree(folder, tmp)
    model, requests, cfg = made.path / "model", tmp_path / "edits.jsonl", tmp_path / "ftl.yaml"
    requests.write_text(json.dumps(REQ.to_dict()) + "\n")
    cfg.write_text("steps: 3\nlr: 0.03\nnorm_constraint: 1.0\n")
    out = tmp_path / "p.safetensors"
    res = CliRunner().invoke(app, ["apply", "--model", str(model), "-m", "ft_l", "--requests",
                                   str(requests), "--config", str(cfg), "-o", str(out), "--root",
                                   str(runs)])  # fmt: skip
    assert res.exit_code == 0, res.output
    run = Path(res.stdout.strip().splitlines()[-1].removeprefix("run: "))
    m = _manifest(run)
    assert run.parent == runs and m["status"] == "done" and m["outputs"] == [str(out)]
    assert {k: v["sha256"] for k, v in m["inputs"].items()} == {
        "model": path_sha256(model), "requests": path_sha256(requests), "config": path_sha256(cfg)
    }  # fmt: skip
    assert m["parents"] == [made.id]
    assert m["config"]["method"] == "ft_l" and m["config"]["config"]["steps"] == 3
    assert m["config"]["requests"] == [REQ.to_dict()] and m["config"]["out"] == str(out)
    # the edited folder, written into the apply run, names both runs that made its inputs
    inside = run / "p.safetensors"
    shutil.copy(out, inside)
    edited = tmp_path / "edited"
    res = CliRunner().invoke(app, ["patch-apply", str(inside), "--model", str(model), "-o",
                                   str(edited), "--root", str(runs)])  # fmt: skip
    assert res.exit_code == 0, res.output
    (applied,) = (p for p in runs.iterdir() if p.name.endswith("patch-apply"))
    m = _manifest(applied)
    assert m["status"] == "done" and m["outputs"] == [str(edited)]
    assert m["parents"] == [made.id, run.name]
    assert m["inputs"]["patch"]["sha256"] == path_sha256(inside)


def test_a_failed_apply_leaves_a_failed_run_and_no_patch(folder, tmp_path):
    runs, memory, out = tmp_path / "runs", tmp_path / "m.json", tmp_path / "p.safetensors"
    assert CliRunner().invoke(app, ["apply", "--model", str(folder), "-m", "ike", *ARGS, "-o",
                                    str(memory), "--root", str(runs)]).exit_code == 0  # fmt: skip
    res = CliRunner().invoke(app, ["apply", "--model", str(folder), "-m", "ft_l", *ARGS, "--on",
                                   str(memory), "-o", str(out), "--root", str(runs)])  # fmt: skip
    assert _one_line_error(res, "--on takes weight patches") and not out.exists()
    (ike,) = runs.glob("*-edit-ike")
    (ft_l,) = runs.glob("*-edit-ft_l")
    m = _manifest(ft_l)
    assert _manifest(ike)["status"] == "done" and m["outputs"] == []
    assert m["status"].startswith("failed: LfmError: ") and "--on takes" in m["status"]
    assert m["inputs"]["on0"]["sha256"] == path_sha256(memory)
