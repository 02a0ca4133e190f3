"""UltraEdit: one closed-form step per turn from normalised [h ‖ ∇] features, lifelong statistics."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from lfm import registry
from lfm.access import Access, narrow
from lfm.edit import Request, UltraEditConfig, UltraEditState, common, ultraedit, ultraedit_step
from lfm.edit.patch import Patch
from lfm.edit.requests import target_ids
from lfm.edit.ultraedit import RunningStats, default_layers
from lfm.errors import AccessError, LfmError

ue = importlib.import_module("lfm.edit.ultraedit")  # `lfm.edit.ultraedit` is also the function
REQ = common.SMOKE_REQUEST  # "The city of the Eiffel Tower" -> " Rome"
SECOND = Request("The old city of Kyoto", "Kyoto", "Berlin")
UNRELATED = "Tokyo is a large city in"
# The tiny model's keys are ~0.05 long: λ = 1e-4 keeps λ ≪ ‖h‖², where the ridge solve fits
# ΔW h_i ≈ v_i (the paper's λ = 1 against a 7B model's keys); η as its scale needs (paper: 1e-6)
CFG = UltraEditConfig(lr=0.01, ridge=1e-4)
WORDS = ["Tower", "Colosseum", "Paris", "Rome", "France", "Berlin", "Germany", "Tokyo", "Japan", "Kyoto", "capital", "city", "large", "old", "located", "Eiffel", "is", "an", "a", "of"]  # fmt: skip
TWENTY = [
    Request(f"The city of the {w}", w, WORDS[(i + 7) % len(WORDS)]) for i, w in enumerate(WORDS)
]


@pytest.fixture
def h():
    return common.smoke_model("llama", 1)  # " Paris" leads " Rome" on REQ before the edit


def _margin(h, prompt: str, new: str, old: str) -> float:
    s = h.score([prompt] * 2, [f" {new}", f" {old}"])
    return float(s[0] - s[1])


def _top(h, prompts: list[str]) -> list[str]:
    ids = h.next_token_logprobs(prompts).argmax(-1)
    return [h.tokenizer.decode(int(i)).strip() for i in ids]


def test_edit_wins_unrelated_keeps_its_argmax_and_revert_is_exact(h):
    weights = {k: v.clone() for k, v in h.model.state_dict().items()}
    base = h.next_token_logprobs([REQ.prompt, UNRELATED])
    assert _margin(h, REQ.prompt, "Rome", "Paris") < 0
    patch = registry.run("edit", "ultraedit", h, [REQ, SECOND], cfg=CFG)
    assert isinstance(patch, Patch) and patch.config["layers"] == [1]
    assert torch.equal(h.next_token_logprobs([REQ.prompt, UNRELATED]), base)  # model unchanged
    undo = patch.apply(h.model)
    assert _margin(h, REQ.prompt, "Rome", "Paris") > 0, "UltraEdit did not make ' Rome' win"
    assert _top(h, [UNRELATED]) == [h.tokenizer.decode(int(base[1].argmax())).strip()]
    undo.revert(h.model)
    assert all(torch.equal(weights[k], v) for k, v in h.model.state_dict().items())


def test_without_the_closed_form_solve_the_edit_does_not_win(h, monkeypatch):
    """ΔW = Vᵀ H (the targets written onto the keys without (H Hᵀ + λI)⁻¹): the edit fails."""
    monkeypatch.setattr(ue, "parameter_shift", lambda k, v, lam: (v.T.float(), k.T.float()))
    undo = ultraedit(h, [REQ, SECOND], CFG).apply(h.model)
    try:
        assert _margin(h, REQ.prompt, "Rome", "Paris") < 0
    finally:
        undo.revert(h.model)


def _efficacy_after_twenty(h, cfg: UltraEditConfig) -> float:
    """Turns of one request each, every patch applied; the share of the 20 edits whose target
    then beats the unedited model's top token."""
    old = _top(h, [r.prompt for r in TWENTY])
    state, undos = None, []
    for r in TWENTY:
        patch, state = ultraedit_step(h, r, state, cfg)
        undos.append(patch.apply(h.model))
    try:
        wins = [_margin(h, r.prompt, r.target, o) > 0 for r, o in zip(TWENTY, old, strict=True)]
    finally:
        for undo in reversed(undos):
            undo.revert(h.model)
    assert state is not None and state.turns == 20
    return sum(wins) / len(wins)


def test_twenty_turns_keep_the_early_edits_only_with_lifelong_normalisation(h):
    with_norm = _efficacy_after_twenty(h, CFG)
    without = _efficacy_after_twenty(h, CFG.replace(normalise=False))
    # measured: 0.9 with the normalisation, 0.05 without at the same η (docs/edit.md)
    assert with_norm >= 0.8, with_norm
    assert without <= 0.1, without


def test_the_solve_is_the_ridge_solution_and_fits_the_targets():
    torch.manual_seed(0)
    keys, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    u, v = ue.parameter_shift(keys, values, 0.5)
    primal = torch.linalg.solve(keys.T @ keys + 0.5 * torch.eye(6, dtype=torch.float64),
                                keys.T @ values)  # (HᵀH + λI)⁻¹HᵀV, (D_in, D_out)  # fmt: skip
    assert torch.allclose((u @ v.T).double(), primal.T.float().double(), atol=1e-5)
    u, v = ue.parameter_shift(keys, values, 1e-8)  # λ → 0: ΔW h_i = v_i for every key
    assert torch.allclose((keys.float() @ (u @ v.T).T).double(), values, atol=1e-4)


def test_running_statistics_of_two_turns_equal_those_of_the_features_together():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64) + 2
    stats = RunningStats.empty(5).update(a).update(b)
    both = torch.cat([a, b])
    assert stats.count == 7
    assert torch.allclose(stats.mean, both.mean(0))
    assert torch.allclose(stats.std(0.0) ** 2, both.var(0))  # the unbiased variance, N − 1
    z = torch.randn(2, 5, dtype=torch.float64)
    assert torch.allclose(stats.normalise(z, 0.0), (z - both.mean(0)) / both.std(0))


def test_state_saves_loads_continues_and_checks_the_sequence(h, tmp_path):
    p1, s1 = ultraedit_step(h, [REQ, SECOND], None, CFG)
    assert s1.turns == 1 and sorted(s1.stats) == [1] and s1.stats[1].count == 2
    loaded = UltraEditState.load(s1.save(tmp_path / "s.safetensors"))
    assert (loaded.after, loaded.turns) == (s1.after, 1)
    assert torch.equal(loaded.stats[1].mean, s1.stats[1].mean)
    assert torch.equal(loaded.stats[1].m2, s1.stats[1].m2)
    with pytest.raises(LfmError, match="apply the previous"):
        ultraedit_step(h, TWENTY[0], loaded, CFG)
    p1.apply(h.model)
    p2, s2 = ultraedit_step(h, TWENTY[0], loaded, CFG)
    q2, _ = ultraedit_step(h, TWENTY[0], s1, CFG)
    assert torch.equal(p2.deltas[0].matrix(), q2.deltas[0].matrix())
    n = len(target_ids(h.tokenizer, TWENTY[0].prompt, TWENTY[0].target))  # one feature a token
    assert s2.turns == 2 and s2.stats[1].count == 2 + n
    with pytest.raises(LfmError, match="edits layers"):
        ultraedit_step(h, TWENTY[0], s1, CFG.replace(layers=(0, 1)))
    with pytest.raises(AccessError, match=r"needs WEIGHTS access.*only HIDDEN"):
        ultraedit_step(narrow(h, Access.HIDDEN), TWENTY[0], s1, CFG)


def test_patch_saves_and_reverts_bit_for_bit(h, tmp_path):
    weights = {k: v.clone() for k, v in h.model.state_dict().items()}
    patch = ultraedit(h, [REQ, SECOND], CFG)
    loaded = Patch.load(patch.save(tmp_path / "p.safetensors"))
    undo = loaded.apply(h.model)
    edited = h.next_token_logprobs([REQ.prompt])
    undo.revert(h.model)
    assert all(torch.equal(weights[k], v) for k, v in h.model.state_dict().items())
    undo = patch.apply(h.model)
    assert torch.equal(h.next_token_logprobs([REQ.prompt]), edited)
    undo.revert(h.model)
    assert all(torch.equal(weights[k], v) for k, v in h.model.state_dict().items())


def test_default_window_is_the_papers_scaled_to_the_depth(h, monkeypatch):
    assert default_layers(h.model) == [1]  # 2 blocks: round(18·2/28) = 1 … min(round(26·2/28), 1)
    monkeypatch.setattr(ue, "num_layers", lambda model: 28)
    assert default_layers(h.model) == list(range(18, 27))  # the paper's GPT-J blocks
    monkeypatch.setattr(ue, "num_layers", lambda model: 30)
    assert default_layers(h.model) == list(range(19, 29))  # SmolLM2


def test_cli_carries_the_state_across_invocations(h, tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    h.model.save_pretrained(tmp_path / "m")
    h.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "cfg.json").write_text(CFG.model_dump_json())
    state = tmp_path / "state.safetensors"

    def run(reqs: list[Request], out: str, *on: str):
        file = tmp_path / f"{out}.jsonl"
        file.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
        args = ["apply", "--model", str(tmp_path / "m"), "-m", "ultraedit", "--requests",
                str(file), "--config",
                str(tmp_path / "cfg.json"), "--state", str(state), "--out", str(tmp_path / out),
                "--root", str(tmp_path / "runs")]  # fmt: skip
        return CliRunner().invoke(
            app, [*args, *(x for p in on for x in ("--on", str(tmp_path / p)))]
        )

    # two requests: one single-token request alone is its own running mean, a zero update
    assert run([REQ, SECOND], "p1.safetensors").exit_code == 0
    assert UltraEditState.load(state).turns == 1
    refused = run(TWENTY[:1], "p2.safetensors")  # the first patch is not applied: refused
    assert refused.exit_code == 2 and "apply the previous" in refused.output
    assert UltraEditState.load(state).turns == 1  # a refused turn leaves the state as it was
    done = run(TWENTY[:1], "p2.safetensors", "p1.safetensors")
    assert done.exit_code == 0, done.output
    assert UltraEditState.load(state).turns == 2


def test_editing_features_are_the_keys_and_summed_nll_gradients_at_the_target_positions(h):
    """z = [h ‖ ∇] on the bare prompt: h the down-projection's input and ∇ the gradient of the
    whole target's summed NLL at its output, one row per position predicting a target token,
    here recomputed with the output made a leaf (mutants: a prefix, a mean NLL)."""
    from lfm.edit.site import edit_sites

    req = Request(REQ.prompt, REQ.subject, "Rome Paris")  # a two-token target
    model, tok = h.model, h.tokenizer
    site = edit_sites(model, [1])[0]
    ids, tgt = tok(req.prompt)["input_ids"], target_ids(tok, req.prompt, req.target)
    assert len(tgt) == 2
    pos = list(range(len(ids) - 1, len(ids) - 1 + len(tgt)))
    seen = {}

    def leaf(_m, args, out):
        seen["h"], seen["out"] = args[0].detach(), out.detach().requires_grad_()
        return seen["out"]

    hook = site.projection(model).register_forward_hook(leaf)
    try:
        logits = model(torch.tensor([ids + tgt[:-1]])).logits[0, pos]
        nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt), reduction="sum")
        (grad,) = torch.autograd.grad(nll, [seen["out"]])
    finally:
        hook.remove()
    want = torch.cat([seen["h"][0, pos], grad[0, pos]], -1).double()
    got = ue.editing_features(model, tok, req, [site])
    assert list(got) == [1] and got[1].dtype == torch.float64 and got[1].shape == (2, 32 + 64)
    assert torch.allclose(got[1], want, rtol=1e-5, atol=1e-9)


def test_each_target_is_scaled_by_its_own_normalised_key_norm():
    z_hat = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 1.0, 1.0]], dtype=torch.float64)
    v = ue.targets(z_hat, 2, 0.5)  # v_i = −η ‖ĥ_i‖² ∇̂_i: ‖ĥ‖² = 1 and 9, not their sum 10
    assert torch.equal(v, torch.tensor([[-1.0, 0.5], [-4.5, -4.5]], dtype=torch.float64))


def test_the_ridge_enters_the_solve_at_full_precision():
    """λ = 1e-44 lies below float32's normal range (float32 holds it as 9.8e-45): the solve uses
    the λ given, in float64 (mutants: the identity λI made in float32)."""
    torch.manual_seed(0)
    keys = torch.randn(2, 3, dtype=torch.float64) * 1e-25  # H Hᵀ ~ 1e-50 ≪ λ
    values = torch.randn(2, 4, dtype=torch.float64)
    u, v = ue.parameter_shift(keys, values, 1e-44)
    want = values.T @ torch.linalg.solve(keys @ keys.T + 1e-44 * torch.eye(2).double(), keys)
    assert torch.allclose(u.double() @ v.double().T, want, rtol=1e-5)


def test_state_keeps_float64_statistics_and_counts_past_float32s_integers(tmp_path):
    empty = RunningStats.empty(3)
    assert empty.count == 0 and empty.mean.dtype == empty.m2.dtype == torch.float64
    assert torch.equal(empty.mean, torch.zeros(3).double()) and torch.equal(empty.m2, empty.mean)
    big = 2.0**24 + 1  # a lifelong count of features float32 cannot hold (it reads 2²⁴)
    state = UltraEditState({1: RunningStats(big, empty.mean + 0.5, empty.m2 + 2)}, "abc", 7)
    loaded = UltraEditState.load(state.save(tmp_path / "s.safetensors"))
    assert loaded.stats[1].count == big and (loaded.after, loaded.turns) == ("abc", 7)


def test_a_file_of_another_format_is_refused_as_a_state(tmp_path):
    from lfm.core.io import save_tensors

    path = save_tensors(tmp_path / "p.safetensors", {"x": torch.zeros(1)}, "lfm-patch/1")
    with pytest.raises(LfmError, match=r"is not a lfm-ultraedit-state/1 file"):
        UltraEditState.load(path)


def test_patch_names_its_method_and_turn_and_ultraedit_carries_the_state(h):
    p1, s1 = ultraedit_step(h, [REQ, SECOND], None, CFG)
    assert p1.method == "ultraedit" and p1.info["turn"] == 1
    order = r"^apply the previous UltraEdit patches in order before the next turn$"
    with pytest.raises(LfmError, match=order):  # the state reaches the check
        ultraedit(h, TWENTY[0], CFG, state=s1)
    p1.apply(h.model)
    assert ultraedit(h, TWENTY[0], CFG, state=s1).info["turn"] == 2


def test_refusals_name_the_method_and_the_blocks_named_twice(h):
    hidden = narrow(h, Access.HIDDEN)
    with pytest.raises(AccessError, match=r"^edit/ultraedit needs WEIGHTS access, but the handle"):
        ultraedit_step(hidden, REQ, None, CFG)
    twice = r"^layers \[1, -1\] name a block twice \(as blocks \[1, 1\]\)$"
    with pytest.raises(LfmError, match=twice):
        ultraedit_step(h, REQ, None, CFG.replace(layers=(1, -1)))
