"""Sequential AlphaEdit: the state (earlier keys) is a value, saved, loaded and checked."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lfm.access import Access, narrow
from lfm.edit import AlphaEditConfig, AlphaEditState, Request, alphaedit_step, common, stats
from lfm.edit.patch import Patch
from lfm.errors import AccessError, LfmError

# P = I (every direction "null"): the solve is then a ridge regression that must keep K_p
CFG = AlphaEditConfig(
    v_weight_decay=0.0, clamp_norm=100.0, kl_factor=0.0, v_lr=1.0, v_steps=8, n_prefixes=2,
    null_threshold=1e9,
)  # fmt: skip
SECOND = Request("The old city of Kyoto", "Kyoto", "Berlin")  # subject last: see SMOKE_REQUEST


@pytest.fixture
def lm():
    h = common.smoke_model()
    cov = {layer: common.smoke_cov(h.model, h.tokenizer, layer) for layer in (0, 1)}
    return h, cov


def test_state_round_trips_and_continues_the_sequence(lm, tmp_path):
    h, cov = lm
    p1, s1 = alphaedit_step(h, common.SMOKE_REQUEST, None, CFG, cov=cov)
    # one key column per prefixed prompt (n_prefixes = 2): `key_constraint="each"`
    assert s1.edits == 1 and s1.per_edit == 2 and {k.shape for k in s1.keys.values()} == {(64, 2)}
    s1.save(tmp_path / "s1.safetensors")
    loaded = AlphaEditState.load(tmp_path / "s1.safetensors")
    assert (loaded.base, loaded.after, loaded.per_edit) == (s1.base, s1.after, 2)
    assert all(torch.equal(loaded.keys[k], s1.keys[k]) for k in s1.keys)
    with pytest.raises(LfmError, match="apply the previous"):
        alphaedit_step(h, SECOND, loaded, CFG, cov=cov)
    p1.apply(h.model)
    p2, s2 = alphaedit_step(h, SECOND, loaded, CFG, cov=cov)
    q2, _ = alphaedit_step(h, SECOND, s1, CFG, cov=cov)
    assert all(
        torch.equal(a.matrix(), b.matrix()) for a, b in zip(p2.deltas, q2.deltas, strict=True)
    )
    assert s2.edits == 2 and torch.equal(s2.keys[0][:, :2], s1.keys[0])
    with pytest.raises(LfmError, match="key\\(s\\) per edit"):
        alphaedit_step(h, SECOND, s1, CFG.replace(key_constraint="mean"), cov=cov)
    # the step is no registered method, so it checks its handle itself
    with pytest.raises(AccessError, match=r"needs WEIGHTS access.*only HIDDEN"):
        alphaedit_step(narrow(h, Access.HIDDEN), SECOND, s1, CFG, cov=cov)


def test_earlier_keys_are_protected_by_the_state(lm):
    h, cov = lm
    p1, s1 = alphaedit_step(h, common.SMOKE_REQUEST, None, CFG, cov=cov)
    p1.apply(h.model)
    with_state, _ = alphaedit_step(h, SECOND, s1, CFG, cov=cov)
    without, _ = alphaedit_step(h, SECOND, None, CFG, cov=cov)
    for a, b in zip(with_state.deltas, without.deltas, strict=True):
        layer = int(a.module.split(".")[2])
        k = s1.keys[layer].float()
        assert (a.matrix() @ k).norm() < 0.5 * (b.matrix() @ k).norm()


def test_cli_sequence_across_invocations(lm, tmp_path, monkeypatch):
    from lfm.cli.edit import app

    monkeypatch.setenv("LFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stats, "corpus_texts", lambda corpus: list(common.SMOKE_TEXTS) * 4)
    h, _ = lm
    h.model.save_pretrained(tmp_path / "m")
    h.tokenizer.save_pretrained(tmp_path / "m")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(CFG.replace(stats_tokens=200, stats_max_len=32).model_dump_json())
    state, runs = tmp_path / "state.safetensors", tmp_path / "runs"

    def run(req: Request, out: str, *on: str):
        args = ["apply", "--model", str(tmp_path / "m"), "-m", "alphaedit", "--prompt",
                req.prompt, "--subject", req.subject, "--target", req.target, "--config", str(cfg),
                "--state", str(state), "--out", str(tmp_path / out), "--root", str(runs)]  # fmt: skip
        for p in on:
            args += ["--on", str(tmp_path / p)]
        return CliRunner().invoke(app, args)

    assert run(common.SMOKE_REQUEST, "p1.safetensors").exit_code == 0
    assert AlphaEditState.load(state).edits == 1
    refused = run(SECOND, "p2.safetensors")  # the first patch was not applied
    assert refused.exit_code == 2 and "apply the previous" in refused.output
    res = run(SECOND, "p2.safetensors", "p1.safetensors")
    assert res.exit_code == 0, res.output
    assert AlphaEditState.load(state).edits == 2
    first, failed, last = (json.loads((r / "manifest.json").read_text())
                           for r in sorted(runs.iterdir()))  # fmt: skip
    assert first["status"] == "done" and "state" not in first["inputs"]
    assert failed["status"].startswith("failed: ") and last["status"] == "done"
    assert set(last["inputs"]) == {"model", "config", "on0", "state"}
    assert last["outputs"] == [str(tmp_path / "p2.safetensors"), str(state)]
    Patch.load(tmp_path / "p1.safetensors").apply(h.model)
    Patch.load(tmp_path / "p2.safetensors").apply(h.model)  # p2 was made on top of p1
