"""GRACE: a codebook at one layer replaces its output where a key is hit, and nowhere else."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from lfm import registry
from lfm.core.io import save_tensors
from lfm.edit import CodebookPatch, GraceConfig, Request, common, grace
from lfm.edit.grace import Codebook, lookup, replace_hits, update
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


# What mutation testing (`make mutate AREA=edit`) found untested in `lfm.edit.grace`: each test
# below fails with the mutants it was written against.


def test_empty_codebook_has_the_documented_shapes():
    # keys (0, D_in), values (0, D_out): a 1-D empty tensor would also concatenate (mutants
    # Codebook.empty 12, 17)
    book = Codebook.empty(3, 2)
    assert book.keys.shape == (0, 3) and book.values.shape == (0, 2) and book.radii.shape == (0,)


def test_an_input_exactly_on_the_radius_is_inside():
    """The paper's rule: replaced if ‖h − k‖ ≤ ε (an expanded radius reaches its key exactly)."""
    book = Codebook.empty(2, 1)
    book.add(torch.zeros(2), torch.ones(1), 5.0, "Rome")
    idx, inside = lookup(book, torch.tensor([[3.0, 4.0], [3.0, 4.1]]))  # distances 5, 5.08
    assert idx.tolist() == [0, 0] and inside.tolist() == [True, False]


def test_replacement_keeps_the_layers_dtype_and_other_positions_bit_for_bit():
    book = Codebook.empty(2, 3)
    book.add(torch.zeros(2), torch.tensor([1.0, 2.0, 1 / 3]), 0.5, "Rome")
    out = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got = replace_hits(book, torch.tensor([[[0.0, 0.1], [2.0, 2.0]]]), out)
    assert got.dtype == torch.bfloat16  # a float32 value must not promote a bf16 layer's output
    assert torch.equal(got[0, 0], book.values[0].to(torch.bfloat16))
    assert torch.equal(got[0, 1], out[0, 1])


def test_a_cpu_codebook_follows_the_activations_device(monkeypatch):
    """A loaded codebook (CPU) serves a model on another device: keys, radii and values move to
    the activations' device. "meta" stands in for a GPU; `torch.cdist`, lenient on meta, is made
    as strict as on CUDA."""
    cdist = torch.cdist

    def strict_cdist(a, b, *args, **kwargs):
        if a.device != b.device:
            raise RuntimeError(f"cdist: {a.device} and {b.device}")
        return cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", strict_cdist)
    book = Codebook.empty(2, 3)
    book.add(torch.zeros(2), torch.ones(3), 1.0, "Rome")
    x = torch.zeros(1, 4, 2, device="meta")
    idx, inside = lookup(book, x)
    assert idx.device.type == inside.device.type == "meta" and inside.shape == (1, 4)
    out = replace_hits(book, x, torch.zeros(1, 4, 3, device="meta", dtype=torch.bfloat16))
    assert out.device.type == "meta" and out.dtype == torch.bfloat16 and out.shape == (1, 4, 3)


def test_key_is_the_layer_input_at_the_prompts_last_token_not_the_subjects(h):
    req = Request("The Eiffel Tower is in the city of", "Eiffel Tower", "Rome")
    patch = grace(h, req, GraceConfig(steps=1, eps_init=1e-3))
    seen: dict[str, torch.Tensor] = {}
    module = h.model.get_submodule(patch.module)
    hook = module.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0].detach()))
    try:
        h.model(**h.tokenizer(req.prompt, return_tensors="pt"))
    finally:
        hook.remove()
    assert torch.allclose(patch.codebook.keys[0], seen["x"][0, -1], atol=1e-6)
    assert not torch.allclose(patch.codebook.keys[0], seen["x"][0, -5], atol=1e-3)  # "Tower"


def test_info_records_the_layer_and_each_edits_rule_and_nll_trace(h):
    # the repeated request has the same key and label: it expands the entry, no value is trained
    patch = grace(h, [REQ, REQ], GraceConfig(steps=3, eps_init=1e-3, stop_nll=0))
    assert patch.codebook.labels == ["Rome"] and patch.info["layer"] == 0
    first, second = patch.info["steps"]
    assert second == {"rule": "expand"}
    assert first["rule"] == "add" and first["steps"] == 2  # the index of the last of 3 steps
    nll = -float(h.score([REQ.prompt], [" Rome"]))  # the unedited model's, on the bare prompt
    assert first["nll_start"] == pytest.approx(nll, abs=1e-5)
    assert first["nll_end"] < first["nll_start"] - 0.1


def test_training_stops_once_the_nll_is_below_stop_nll_not_at_it(h):
    nll = grace(h, REQ, GraceConfig(steps=1, eps_init=1e-3)).info["steps"][0]["nll_start"]
    below = grace(h, REQ, GraceConfig(steps=3, eps_init=1e-3, stop_nll=nll + 1))
    assert below.info["steps"][0] == {"rule": "add", "nll_start": nll, "nll_end": nll, "steps": 0}
    at = grace(h, REQ, GraceConfig(steps=3, eps_init=1e-3, stop_nll=nll))  # not below: steps on
    assert at.info["steps"][0]["steps"] >= 1 and at.info["steps"][0]["nll_end"] < nll


def test_a_continued_codebook_keeps_the_earlier_step_records(h):
    cfg, other = (
        GraceConfig(steps=1, eps_init=1e-3),
        Request("The capital of Japan", "Japan", "Berlin"),
    )
    first = grace(h, REQ, cfg)
    grown = grace(h, other, cfg, codebook=first)
    assert [s["rule"] for s in grown.info["steps"]] == ["add", "add"]
    assert grown.info["steps"][0] == first.info["steps"][0]
    bare = grace(h, other, cfg, codebook=replace(first, info={}))  # no records: only the new one
    assert [s["rule"] for s in bare.info["steps"]] == ["add"]


def test_config_layer_picks_the_block_and_another_layer_cannot_continue_it(h):
    patch = grace(h, REQ, GraceConfig(steps=1, eps_init=1e-3, layer=-1))
    assert patch.module == "model.layers.1.mlp.down_proj" and patch.info["layer"] == 1
    msg = "^the earlier codebook wraps model.layers.1.mlp.down_proj, this config model.layers.0"
    with pytest.raises(LfmError, match=msg):
        grace(h, REQ, GraceConfig(steps=1, eps_init=1e-3), codebook=patch)


def test_a_model_without_its_tokenizer_is_refused_naming_grace(h):
    with pytest.raises(LfmError, match=r"^edit/grace needs a LocalModel \(a model with its tok"):
        grace(h.model, REQ, CFG)


def test_check_names_grace_when_the_module_is_missing_or_the_weights_differ(h):
    patch = grace(h, REQ, GraceConfig(steps=1, eps_init=1e-3))
    with pytest.raises(LfmError, match=r"^patch \(grace\) wraps model.layers.7.mlp.down_proj, wh"):
        replace(patch, module="model.layers.7.mlp.down_proj").check(h.model)
    with pytest.raises(LfmError, match=r"^patch \(grace\) was made for other weights \(base 0"):
        replace(patch, base="0" * 64).check(h.model)


def test_saved_codebook_keeps_its_method_name(h, tmp_path):
    patch = grace(h, REQ, GraceConfig(steps=1, eps_init=1e-3))
    assert CodebookPatch.load(patch.save(tmp_path / "g.safetensors")).method == "grace"
    renamed = replace(patch, method="grace_variant")
    assert CodebookPatch.load(renamed.save(tmp_path / "v.safetensors")).method == "grace_variant"


def test_the_first_key_of_an_empty_codebook_is_added_with_eps_init():
    # the rule's name is what `grace` records in `info["steps"]` (mutants update 2, 3)
    assert update(Codebook.empty(2, 1), torch.tensor([5.0, 5.0]), "Rome", 0.25) == ("add", 0.25)


def test_the_rule_measures_each_entrys_own_distance_and_overlaps_at_eps_i_plus_eps_init():
    """The nearest of several entries, by ‖k_i − h‖ (not one norm over the whole codebook, nor
    ‖k_i + h‖); a key at exactly ε_i + ε_init from it overlaps (the paper: add if d > ε_i +
    ε_init)."""
    book = Codebook.empty(2, 1)
    book.add(torch.tensor([4.0, 0.0]), torch.zeros(1), 1.0, "Rome")
    book.add(torch.tensor([0.0, 4.0]), torch.zeros(1), 1.0, "Paris")
    # entry 1 at distance 1 (entry 0 at 5), another label: split
    assert update(book, torch.tensor([0.0, 3.0]), "Berlin", 1.0) == ("split", 0.5)
    assert book.radii.tolist() == [1.0, 0.5]
    # entry 0 at distance 2 = ε_0 + ε_init, the same label: it expands to reach the key
    assert update(book, torch.tensor([6.0, 0.0]), "Rome", 1.0) == ("expand", 0.0)
    assert book.radii.tolist() == [2.0, 0.5]
