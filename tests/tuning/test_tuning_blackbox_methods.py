"""BBT, MeZO and discrete prompt search on a tiny model: they improve, and black-box ones run the
same through a narrowed local handle and a live served one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lfm.access import narrow
from lfm.errors import AccessError, ConfigError
from lfm.serve import Backend, Budget, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.bbt import BBTConfig, bbt, class_scores_bbt, load_prompt, projection, soft_prompt
from lfm.tuning.mezo import MeZOConfig, label_loss_fn, mezo, mezo_step, perturb, select, zero_order
from lfm.tuning.prompt_search import PromptSearchConfig, load_template, prompt_search
from lfm.tuning.tasks import TextClassification
from lfm.tuning.tiny import tiny_news_lm as tiny_lm
from lfm.tuning.tiny import tiny_task

VERB = tiny_task().verbalizer
SMALL_BBT = BBTConfig(n_tokens=4, intrinsic_dim=16, popsize=8, budget=81, sigma0=1.0)


def _xy() -> tuple[TextClassification, list[str], torch.Tensor]:
    task = tiny_task()
    return task, list(task.texts), task.labels


@pytest.fixture(scope="module")
def served():
    lm = tiny_lm(0)
    with running(build_app(Backend(lm, "embeddings"), ServeSettings())) as url:
        yield lm, url


def test_bbt_improves_over_its_starting_prompt():
    task, texts, y = _xy()
    handle = narrow(tiny_lm(0), "embeddings")
    res = bbt(handle, task, SMALL_BBT, seed=0)
    # a random tiny model is nearly flat in its input (start ≈ ln 3); the gain is small but far
    # above float noise (~1e-7), and the prompt kept reproduces the loss it was kept for
    assert res.best_loss < res.start_loss - 1e-3 and res.evaluations == 81
    assert res.history == sorted(res.history, reverse=True) and res.prompt.shape == (4, 32)
    kept = torch.nn.functional.cross_entropy(class_scores_bbt(handle, res.prompt, texts, VERB), y)
    assert abs(float(kept) - res.best_loss) < 1e-5
    assert torch.equal(res.scores(handle, texts), class_scores_bbt(handle, res.prompt, texts, VERB))


def test_bbt_saves_the_prompt_and_what_regenerates_its_projection(tmp_path):
    task, _, _ = _xy()
    handle = narrow(tiny_lm(0), "embeddings")
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    res = bbt(handle, task, SMALL_BBT.replace(budget=13), seed=5)
    assert (np.random.get_state()[1] == np_state).all()  # CMA-ES seeded NumPy: given back
    assert torch.equal(torch.get_rng_state(), torch_state)
    res.save(tmp_path / "bbt")
    prompt, meta = load_prompt(tmp_path / "bbt")
    assert torch.equal(prompt, res.prompt) and meta["seed"] == 5
    cfg = SMALL_BBT
    a = projection(
        cfg.intrinsic_dim, cfg.n_tokens, 32, meta["emb_std"], meta["sigma0"], meta["seed"]
    )
    torch.testing.assert_close(soft_prompt(meta["z"].numpy(), a, cfg.n_tokens), prompt)
    assert meta["verbalizer"]["label_words"] == list(VERB.label_words)
    record = json.loads((tmp_path / "bbt" / "result.json").read_text())
    assert record["method"] == "bbt" and record["best_loss"] == res.best_loss


def test_bbt_runs_the_same_on_local_and_remote_handles(served):
    lm, url = served
    task, texts, _ = _xy()
    cfg = SMALL_BBT.replace(budget=17)
    local = bbt(narrow(lm, "embeddings"), task, cfg, seed=1)
    remote_handle = RemoteModel(url, access="embeddings")
    remote = bbt(remote_handle, task, cfg, seed=1)
    assert (
        abs(local.best_loss - remote.best_loss) < 1e-4 and local.evaluations == remote.evaluations
    )
    scores = class_scores_bbt(remote_handle, remote.prompt, texts, VERB)
    assert torch.allclose(
        scores, class_scores_bbt(narrow(lm, "embeddings"), local.prompt, texts, VERB), atol=1e-4
    )


def test_bbt_stops_cleanly_when_the_api_budget_is_spent(served):
    _, url = served
    task, _, _ = _xy()
    remote = RemoteModel(url, access="embeddings", budget=Budget(calls=12))
    res = bbt(remote, task, SMALL_BBT, seed=0)
    assert res.stopped == "api-budget" and res.evaluations < SMALL_BBT.budget
    assert res.best_loss <= res.start_loss and remote.budget.used_calls == 12


def test_bbt_refuses_a_scores_handle_and_a_task_without_label_words():
    task, texts, y = _xy()
    with pytest.raises(AccessError, match=r"needs EMBEDDINGS access.*only SCORES"):
        bbt(narrow(tiny_lm(0), "scores"), task, SMALL_BBT)
    with pytest.raises(ConfigError, match="BBT classifies through label words"):
        bbt(narrow(tiny_lm(0), "embeddings"), TextClassification(texts, y, n_classes=3), SMALL_BBT)
    with pytest.raises(
        ConfigError, match="tuning/bbt learns from a TextClassification, not a list"
    ):
        bbt(narrow(tiny_lm(0), "embeddings"), texts, SMALL_BBT)


def test_mezo_perturbations_are_seeded_and_restore_the_parameters():
    lm = tiny_lm(0)
    params = select(lm.model, r"layers\.0\.")
    before = [p.detach().clone() for p in params]
    perturb(params, seed=7, scale=1e-3)
    moved = [p.detach().clone() for p in params]
    perturb(params, seed=7, scale=-2e-3)
    perturb(params, seed=7, scale=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, moved, strict=True))
    for a, b in zip(before, params, strict=True):  # back to θ up to float rounding
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    perturb(params, seed=7, scale=1e-3)  # same seed: the same z again
    assert all(torch.allclose(m, p, atol=1e-6) for m, p in zip(moved, params, strict=True))


def test_mezo_step_with_zero_lr_leaves_the_model_and_decreasing_loss():
    lm = tiny_lm(0)
    _, texts, y = _xy()
    loss = label_loss_fn(lm, texts, y, VERB)
    params = select(lm.model, "")
    before = [p.detach().clone() for p in params]
    mezo_step(params, loss, 3, MeZOConfig(lr=1e-30))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, params, strict=True))
    start = loss()
    zero_order(lm.model, loss, MeZOConfig(steps=60, lr=1e-2, params=r"layers\.1\.|norm"), seed=0)
    assert loss() < start - 0.05


def test_mezo_tunes_a_copy_of_the_handles_model_on_the_label_word_loss():
    lm, task = tiny_lm(0), tiny_task()
    cfg = MeZOConfig(steps=60, lr=1e-2, params=r"layers\.1\.|norm")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = mezo(lm, task, cfg, seed=0, eval_data=task)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert res.metrics["loss"] < res.metrics["start_loss"] - 0.05 and len(res.history) == 60
    again = tiny_lm(0)  # the same steps by hand on a fresh copy: the same weights
    zero_order(again.model, label_loss_fn(again, task.texts, task.labels, VERB), cfg, seed=0)
    for k, v in res.backbone.state_dict().items():
        torch.testing.assert_close(v, again.model.state_dict()[k], rtol=0, atol=1e-6)
    assert 0.0 <= res.metrics["acc"] <= 1.0 and "zero_shot_acc" in res.metrics


def test_mezo_refuses_a_narrowed_handle():
    with pytest.raises(AccessError, match="needs WEIGHTS access"):
        mezo(narrow(tiny_lm(0), "hidden"), tiny_task(), MeZOConfig(steps=1))
    assert not hasattr(narrow(tiny_lm(0), "embeddings"), "model")


def test_prompt_search_keeps_the_best_and_runs_the_same_remotely(served, tmp_path):
    lm, url = served
    task, _, _ = _xy()
    cfg = PromptSearchConfig(iterations=3, candidates=3, patience=3)
    local = prompt_search(narrow(lm, "scores"), task, cfg, seed=0)
    remote = prompt_search(RemoteModel(url, access="scores"), task, cfg, seed=0)
    assert local.best_score >= local.start_score and local.evaluations == 10
    assert local.best == remote.best and abs(local.best_score - remote.best_score) < 1e-4
    local.save(tmp_path / "ps")
    assert load_template(tmp_path / "ps") == local.verbalizer


def test_prompt_search_stops_cleanly_on_budget(served):
    _, url = served
    task, _, _ = _xy()
    remote = RemoteModel(url, access="scores", budget=Budget(calls=6))
    res = prompt_search(remote, task, PromptSearchConfig(iterations=5, candidates=3), seed=0)
    assert res.stopped == "api-budget" and res.best_score >= res.start_score


def test_prompt_search_without_demonstrations_scores_every_example():
    task, _, _ = _xy()
    cfg = PromptSearchConfig(n_demos=0, iterations=1, candidates=2)
    res = prompt_search(narrow(tiny_lm(0), "scores"), task, cfg, seed=0)
    assert res.best.demos == () and "Topic: sport" not in res.verbalizer.template
    assert res.evaluations == 3 and res.best_score >= res.start_score
