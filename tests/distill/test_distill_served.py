"""Distillation from a teacher that sends only its top-k log-probabilities: token-id scoring on the
server, the on-disk cache, `topk_lm` and `gkd` (their defining steps), and `lfm distill lm|cache`
with a served, cached or local teacher; `seq_kd` from a served model's text and `fitnets` from
one served at HIDDEN, through the command line. Also what `topk_lm` and `gkd` hand the training
loop (the run's seed, run directory and evaluation; their counts and logged parts), how GKD draws
and seeds each batch's on-policy sample, and that `student_samples` samples the whole vocabulary
at its temperature, attends to every prompt token and adds exactly `new` tokens."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lfm.access import LocalModel, narrow
from lfm.core.tiny import tiny_lm
from lfm.core.train import TrainConfig
from lfm.distill.lm import student_from_teacher
from lfm.distill.served import (
    GKDConfig,
    TopKCache,
    TopKLMConfig,
    cache_topk,
    generalised_jsd,
    gkd_loss,
    topk_lm_loss,
)
from lfm.errors import ConfigError
from lfm.registry import run
from lfm.serve.app import ServeSettings, build_app
from lfm.serve.backend import Backend
from lfm.serve.client import RemoteModel
from lfm.serve.thread import running

TEXT = (
    "The teacher reads the text and the student learns from what the teacher says. "
    "A small model can learn a great deal from a larger one when both see the same words. "
) * 12


@pytest.fixture(scope="module")
def teacher():
    return LocalModel(*tiny_lm("llama", 0), name="teacher")


@pytest.fixture(scope="module")
def sharp():
    """A teacher with peaked next-token distributions (the tiny model's are near uniform)."""
    model, tok = tiny_lm("llama", 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return LocalModel(model, tok, name="sharp")


def _fresh(seed=7):
    """A student of the teacher's vocabulary that starts far from it."""
    return tiny_lm("llama", seed)[0].train()


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(3, 300, (8, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def served(teacher):
    with running(build_app(Backend(teacher, "scores"))) as url:
        yield url


def _student(teacher, seed=0):
    torch.manual_seed(seed)
    return student_from_teacher(teacher.model, every=2)


def _kl_to_teacher(teacher, student, ids) -> float:
    """Mean KL(p_t ‖ p_s) over every position of `ids`, full distributions."""
    with torch.no_grad():
        log_t = teacher.model(input_ids=ids).logits.float().log_softmax(-1)
        log_s = student(input_ids=ids).logits.float().log_softmax(-1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


# -- the teacher's answers ------------------------------------------------------------------------


def test_local_top_logprobs_hold_the_next_tokens_distribution(teacher, blocks):
    values, ids = teacher.top_logprobs(blocks, 4)
    assert values.shape == ids.shape == (8, 11, 4)
    with torch.no_grad():
        log_p = teacher.model(input_ids=blocks).logits.float().log_softmax(-1)
    want_v, want_i = log_p[:, :-1].topk(4, -1)  # position t: the distribution of token t+1
    assert torch.equal(ids, want_i)
    assert torch.allclose(values, want_v, atol=1e-6)
    assert (values[..., :-1] >= values[..., 1:]).all()  # in rank order


def test_a_served_teacher_answers_token_ids_as_the_local_one(teacher, blocks, served):
    remote = RemoteModel(served)
    values, ids = remote.top_logprobs(blocks, 5)
    want_v, want_i = teacher.top_logprobs(blocks, 5)
    assert torch.equal(ids, want_i)
    assert torch.allclose(values, want_v, atol=1e-5)


def test_token_id_prompts_are_scored_only_and_checked(served):
    with httpx.Client(base_url=served) as http:
        body = {"prompt": [[5, 6, 7]], "max_tokens": 0, "echo": True, "logprobs": 2}
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200, ok.text
        lp = ok.json()["choices"][0]["logprobs"]
        assert lp["token_ids"] == [5, 6, 7] and lp["top_token_ids"][0] is None
        assert [len(r) for r in lp["top_token_ids"][1:]] == [2, 2]
        one_row = http.post("/v1/completions", json={**body, "prompt": [5, 6, 7]})
        assert one_row.json()["choices"][0]["logprobs"] == lp  # one row sent alone
        gen = http.post("/v1/completions", json={**body, "max_tokens": 3})
        assert gen.status_code == 422 and "scored only" in gen.json()["detail"]
        far = http.post("/v1/completions", json={**body, "prompt": [[5, 100_000]]})
        assert far.status_code == 422 and "100000" in far.json()["detail"]
        negative = http.post("/v1/completions", json={**body, "prompt": [[5, -1]]})
        assert negative.status_code == 422


def test_a_top_k_server_sends_at_most_k_for_token_ids(teacher):
    g = torch.Generator().manual_seed(0)
    app = build_app(Backend(teacher, "scores"), ServeSettings(top_k=3))
    with running(app) as url, httpx.Client(base_url=url) as http:
        for _ in range(6):  # random rows and k ≤ K: never more than k entries
            rows = torch.randint(0, 320, (2, int(torch.randint(2, 9, (), generator=g))),
                                 generator=g).tolist()  # fmt: skip
            k = int(torch.randint(0, 4, (), generator=g))
            res = http.post("/v1/completions", json={"prompt": rows, "max_tokens": 0,
                                                     "echo": True, "logprobs": k})  # fmt: skip
            assert res.status_code == 200 and res.json()["lfm_top_k"] == 3
            for ch in res.json()["choices"]:
                tops = ch["logprobs"]["top_logprobs"] or []
                assert all(t is None or len(t) <= k for t in tops)
                assert all(
                    t is None or len(t) <= k for t in ch["logprobs"].get("top_token_ids", [])
                )
        over = http.post("/v1/completions", json={"prompt": [[5, 6]], "max_tokens": 0,
                                                  "echo": True, "logprobs": 4})  # fmt: skip
        assert over.status_code == 403


# -- the cache ------------------------------------------------------------------------------------


def test_the_cache_answers_as_the_teacher_without_it(teacher, blocks, tmp_path):
    path = cache_topk(narrow(teacher, "scores"), blocks, 5, tmp_path / "top.npz", batch_size=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["top.npz"]  # nothing half-written
    cache = TopKCache(path)
    assert len(cache) == 8 and cache.k == 5
    order = [5, 0, 7]
    values, ids = cache.top_logprobs(blocks[order], 3)
    want_v, want_i = teacher.top_logprobs(blocks[order], 3)
    assert torch.equal(ids, want_i)
    assert torch.allclose(values, want_v, atol=2e-2)  # float16 on disk
    with pytest.raises(ConfigError, match="top 5 per token, not 6"):
        cache.top_logprobs(blocks[:1], 6)
    other = blocks[:1].clone()
    other[0, 3] += 1
    with pytest.raises(ConfigError, match="not in the cache"):
        cache.top_logprobs(other, 5)


@pytest.mark.parametrize("content", [None, b"not a zip file"])
def test_a_missing_or_foreign_cache_is_one_line(tmp_path, content):
    path = tmp_path / "top.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        TopKCache(path)
    assert "\n" not in str(e.value)


# -- topk_lm ------------------------------------------------------------------------------------


def test_the_top_k_loss_pairs_each_position_with_the_next_tokens_answer(teacher, blocks):
    with torch.no_grad():  # sharpened, so that neighbouring positions' answers differ
        logits = 8 * teacher.model(input_ids=blocks).logits
    cfg = TopKLMConfig(k=320, kd_weight=1.0, lm_weight=0.0)
    # the student's own distributions as the teacher's, in `top_logprobs`' layout
    same = logits[:, :-1].float().log_softmax(-1).topk(320, -1)
    assert float(topk_lm_loss(logits, tuple(same), blocks, cfg)["kd"]) < 1e-5
    shifted = tuple(torch.roll(t, 1, dims=1) for t in same)  # off by one position
    assert float(topk_lm_loss(logits, shifted, blocks, cfg)["kd"]) > 0.1


def test_topk_lm_brings_the_student_to_the_teacher(sharp, blocks):
    student = _fresh()
    before = _kl_to_teacher(sharp, student, blocks)
    cfg = {"k": 20, "kd_weight": 1.0, "lm_weight": 0.0, "batch_size": 4}
    train_cfg = TrainConfig(steps=40, lr=1e-2, progress=False)
    res = run("distill/topk_lm", narrow(sharp, "scores"), student, blocks, cfg=cfg,
              train_cfg=train_cfg)  # fmt: skip
    after = _kl_to_teacher(sharp, res.student, blocks)
    assert after < 0.5 * before, (before, after)
    assert res.info["teacher_blocks"] == 40 * 4
    # the LM loss alone on these random tokens does not get there
    lm_only = run("distill/topk_lm", narrow(sharp, "scores"), _fresh(), blocks,
                  cfg={**cfg, "kd_weight": 0.0, "lm_weight": 1.0}, train_cfg=train_cfg)  # fmt: skip
    assert _kl_to_teacher(sharp, lm_only.student, blocks) > 1.5 * after


def test_served_and_cached_teachers_train_the_same_student_as_the_local_one(
    teacher, blocks, served, tmp_path
):
    start = {n: p.detach().clone() for n, p in _student(teacher).named_parameters()}

    def train_with(handle):
        return run("distill/topk_lm", handle, _student(teacher), blocks,
                   cfg={"k": 5, "batch_size": 4},
                   train_cfg=TrainConfig(steps=4, lr=1e-2, progress=False))  # fmt: skip

    local = train_with(narrow(teacher, "scores"))
    remote = train_with(RemoteModel(served))
    cached = train_with(TopKCache(cache_topk(teacher, blocks, 5, tmp_path / "c.npz")))
    # the server normalises in another order (last-bit differences, which Adam can magnify in
    # weights whose gradients are near zero) and the cache holds float16: the losses agree to
    # that precision, and every tensor moved alike
    assert remote.history.losses == pytest.approx(local.history.losses, rel=1e-5)
    assert cached.history.losses == pytest.approx(local.history.losses, rel=1e-3)
    for (name, p), q, r in zip(local.student.named_parameters(), remote.student.parameters(),
                               cached.student.parameters(), strict=True):  # fmt: skip
        moved = (p - start[name]).norm()
        assert (q - p).norm() <= 0.02 * moved + 1e-6, name
        assert (r - p).norm() <= 0.1 * moved + 1e-6, name


def test_a_student_of_a_smaller_vocabulary_is_refused(teacher, blocks):
    from transformers import AutoModelForCausalLM

    cfg = teacher.model.config.__class__(**{**teacher.model.config.to_dict(), "vocab_size": 100})
    small = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match="distill/uld"):
        run("distill/topk_lm", narrow(teacher, "scores"), small, blocks, cfg={"k": 5})


# -- gkd ----------------------------------------------------------------------------------------


def test_generalised_jsd_against_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.6]])
    lp, lq = p.log(), q.log()
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    assert math.isclose(float(generalised_jsd(lp, lq, 0.0)), kl(p, q), rel_tol=1e-5)
    assert math.isclose(float(generalised_jsd(lp, lq, 1.0)), kl(q, p), rel_tol=1e-5)
    m = 0.5 * p + 0.5 * q
    assert math.isclose(float(generalised_jsd(lp, lq, 0.5)), 0.5 * kl(p, m) + 0.5 * kl(q, m),
                        rel_tol=1e-5)  # fmt: skip
    m = 0.2 * p + 0.8 * q
    assert math.isclose(float(generalised_jsd(lp, lq, 0.2)), 0.2 * kl(p, m) + 0.8 * kl(q, m),
                        rel_tol=1e-5)  # fmt: skip
    assert float(generalised_jsd(lp, lp, 0.5)) == pytest.approx(0.0, abs=1e-7)


def test_gkd_loss_scores_the_output_tokens_only(teacher, blocks):
    with torch.no_grad():
        logits = teacher.model(input_ids=blocks).logits
    same = teacher.top_logprobs(blocks, 320)
    assert float(gkd_loss(logits, same, 6, 0.5)) < 1e-5
    other = teacher.top_logprobs(torch.flip(blocks, dims=[1]), 320)
    mixed = tuple(torch.cat([o[:, :5], s[:, 5:]], 1) for o, s in zip(other, same, strict=True))
    assert float(gkd_loss(logits, mixed, 6, 0.5)) < 1e-5  # prompt positions are not scored
    assert float(gkd_loss(logits, other, 6, 0.5)) > 1e-3


class _Spy:
    """A SCORES handle that records the rows it is asked about."""

    access = narrow(LocalModel(*tiny_lm("llama", 0)), "scores").access

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def top_logprobs(self, rows, k):
        self.rows.append(rows.clone())
        return self.inner.top_logprobs(rows, k)


@pytest.mark.parametrize("on_policy", [0.0, 1.0])
def test_gkd_asks_the_teacher_about_the_students_own_samples(teacher, blocks, on_policy):
    spy = _Spy(narrow(teacher, "scores"))
    res = run("distill/gkd", spy, _student(teacher), blocks,
              cfg={"k": 5, "batch_size": 8, "on_policy": on_policy},
              train_cfg=TrainConfig(steps=3, lr=1e-2, progress=False))  # fmt: skip
    assert res.info["on_policy"] == int(3 * on_policy)
    data = {tuple(r[:6].tolist()): r for r in blocks}
    for rows in spy.rows:
        for r in rows:  # the prompt is the block's first half; its rest is the text's or sampled
            block = data[tuple(r[:6].tolist())]
            assert torch.equal(r, block) == (on_policy == 0.0)


def test_gkd_brings_the_student_to_the_teacher(sharp, blocks):
    student = _fresh()
    before = _kl_to_teacher(sharp, student, blocks)
    res = run("distill/gkd", narrow(sharp, "scores"), student, blocks,
              cfg=GKDConfig(k=20, batch_size=4, beta=0.5),
              train_cfg=TrainConfig(steps=40, lr=1e-2, progress=False))  # fmt: skip
    assert _kl_to_teacher(sharp, res.student, blocks) < 0.6 * before


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, teacher):
    path = tmp_path_factory.mktemp("teacher") / "llama"
    teacher.model.save_pretrained(path)
    teacher.tokenizer.save_pretrained(path)
    return path


def _lm(root, data, *extra):
    from lfm.cli.distill import app

    args = ["lm", "--data", str(data), "--every", "2", "--block-size", "16", "--batch-size", "2",
            "--eval-blocks", "2", "--threads", "1", "--steps", "3", "--root", str(root), *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _manifest(root):
    (run_dir,) = root.iterdir()
    return run_dir, json.loads((run_dir / "manifest.json").read_text())


def test_cli_topk_lm_with_the_local_teacher(tmp_path, model_dir):
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "runs", tmp_path / "t.txt", "--model", str(model_dir), "--method",
              "topk_lm", "--top-k", "5")  # fmt: skip
    assert out.exit_code == 0, out.output
    run_dir, m = _manifest(tmp_path / "runs")
    assert m["status"] == "done" and m["metrics"]["k"] == 5 and m["config"]["temperature"] == 1.0
    assert m["metrics"]["student_ppl"] > 1 and m["metrics"]["teacher_ppl"] > 1
    assert m["metrics"]["teacher_blocks"] == 3 * 2
    assert (run_dir / "student" / "config.json").is_file()


def test_cli_cache_then_train_without_loading_the_teacher(tmp_path, model_dir):
    from lfm.cli.distill import app

    (tmp_path / "t.txt").write_text(TEXT)
    student = tmp_path / "student"
    _student(LocalModel(*tiny_lm("llama", 0))).save_pretrained(student)
    LocalModel(*tiny_lm("llama", 0)).tokenizer.save_pretrained(student)
    made = CliRunner().invoke(app, ["cache", "--model", str(model_dir), "--data",
                                    str(tmp_path / "t.txt"), "--top-k", "5", "--block-size", "16",
                                    "--batch-size", "2", "--steps", "3", "-o",
                                    str(tmp_path / "top.npz"), "--threads", "1"])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "top 5 of 6 blocks" in made.output
    out = _lm(tmp_path / "runs", tmp_path / "t.txt", "--model", str(tmp_path / "no-such-teacher"),
              "--method", "topk_lm", "--top-k", "5", "--teacher-cache", str(tmp_path / "top.npz"),
              "--student", str(student))  # fmt: skip
    assert out.exit_code == 0, out.output  # the teacher's folder does not exist: never loaded
    _, m = _manifest(tmp_path / "runs")
    assert "teacher_ppl" not in m["metrics"] and m["inputs"]["teacher_cache"]["sha256"]


def test_cli_gkd_with_a_served_teacher(tmp_path, model_dir, served):
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "runs", tmp_path / "t.txt", "--model", str(model_dir), "--method", "gkd",
              "--top-k", "5", "--teacher-url", served)  # fmt: skip
    assert out.exit_code == 0, out.output
    _, m = _manifest(tmp_path / "runs")
    assert m["config"]["teacher"] == served and "teacher_ppl" not in m["metrics"]


def test_cli_seq_kd_from_a_served_teacher_equals_the_local_one(tmp_path, model_dir, teacher):
    """Sequence-level KD needs only text: a server at TEXT gives the local run's student."""
    (tmp_path / "t.txt").write_text(TEXT)
    local = _lm(tmp_path / "local", tmp_path / "t.txt", "--model", str(model_dir), "--method",
                "seq_kd")  # fmt: skip
    assert local.exit_code == 0, local.output
    with running(build_app(Backend(teacher, "text"))) as url:
        there = _lm(tmp_path / "served", tmp_path / "t.txt", "--model", str(model_dir),
                    "--method", "seq_kd", "--teacher-url", url)  # fmt: skip
    assert there.exit_code == 0, there.output
    other = LocalModel(*tiny_lm("llama", 3), name="other")  # the same tokenizer, other weights
    with running(build_app(Backend(other, "text"))) as url2:
        elsewhere = _lm(tmp_path / "other", tmp_path / "t.txt", "--model", str(model_dir),
                        "--method", "seq_kd", "--teacher-url", url2)  # fmt: skip
    assert elsewhere.exit_code == 0, elsewhere.output
    _, want = _manifest(tmp_path / "local")
    _, got = _manifest(tmp_path / "served")
    _, moved = _manifest(tmp_path / "other")
    assert got["config"]["teacher"] == url and "teacher_ppl" not in got["metrics"]
    assert got["metrics"]["student_ppl"] == pytest.approx(want["metrics"]["student_ppl"], rel=1e-5)
    # the served model's text is what the student learns: another model's gives another student
    assert moved["metrics"]["student_ppl"] != pytest.approx(want["metrics"]["student_ppl"], 1e-3)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--method", "lm_student", "--teacher-cache", "x.npz"], "--teacher-cache is for"),
        (["--method", "lm_student", "--teacher-url", "http://h"], "is for --method topk_lm, gkd, "
         "fitnets or seq_kd, not lm_student"),
        (["--method", "gkd", "--teacher-cache", "x.npz"], "no cache holds"),
        (["--method", "topk_lm", "--teacher-cache", "x.npz", "--teacher-url", "http://h"],
         "not both"),
        (["--method", "topk_lm", "--teacher-cache", "missing.npz"], "does not exist"),
        (["--method", "fitnets", "--teacher-cache", "x.npz"], "no cache holds"),
        (["--method", "fitnets", "--teacher-url", "SERVED", "--student", "s"],
         "--hint model.layers.N"),
        (["--method", "fitnets", "--teacher-url", "SERVED"],
         "gives SCORES: serve it with `lfm serve --access hidden`"),
        (["--method", "topk_lm", "--hint", "model.layers.0"], "are for --method fitnets"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_teacher_options_in_one_line(tmp_path, extra, says, monkeypatch, capsys,
                                                     served):  # fmt: skip
    import sys

    import lfm.cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(TEXT)
    extra = [served if e == "SERVED" else e for e in extra]  # a server at SCORES
    argv = ["lfm", "distill", "lm", "--model", "nothing", "--data", "t.txt", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        lfm.cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert done.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "runs").exists()


def test_kd_on_the_full_support_equals_full_logit_kd(sharp, blocks):
    """With k = V the top-k loss is the full KL: nothing is lost but the tail."""
    teacher = sharp
    with torch.no_grad():
        s_logits = _fresh()(input_ids=blocks).logits
        t_logits = teacher.model(input_ids=blocks).logits
    full = F.kl_div(s_logits[:, :-1].log_softmax(-1).flatten(0, 1),
                    t_logits[:, :-1].log_softmax(-1).flatten(0, 1), log_target=True,
                    reduction="batchmean")  # fmt: skip
    cfg = TopKLMConfig(k=320, kd_weight=1.0, lm_weight=0.0)
    got = topk_lm_loss(s_logits, teacher.top_logprobs(blocks, 320), blocks, cfg)["kd"]
    assert float(got) == pytest.approx(float(full), rel=1e-3)


def test_class_scores_through_a_top_k_server_equal_the_full_ones(teacher):
    """Prompt classification on a top-k server scores each label word as a continuation (the full
    next-token row is refused there) and gets the same numbers."""
    from lfm.tuning.tasks import Verbalizer, class_scores

    verb = Verbalizer(
        template="Text: {text}\nTopic:", label_words=("the", "model", "of")
    )  # one token each
    texts = ["the teacher reads", "a small model"]
    want = class_scores(narrow(teacher, "scores"), texts, verb)
    with running(build_app(Backend(teacher, "scores"), ServeSettings(top_k=2))) as url:
        remote = RemoteModel(url)
        assert remote.top_k == 2
        got = class_scores(remote, texts, verb)
    assert torch.allclose(got, want, atol=1e-4)


def test_an_interrupted_gkd_run_resumes_to_the_same_student(tmp_path, model_dir, monkeypatch):
    """GKD's on-policy draws come from the seed and each batch's tokens, so a run killed after a
    checkpoint and resumed ends where the uninterrupted run does."""
    from safetensors.torch import load_file

    import lfm.core.train

    (tmp_path / "t.txt").write_text(TEXT)
    flags = ["--model", str(model_dir), "--method", "gkd", "--top-k", "5", "--steps", "4",
             "--ckpt-every", "2"]  # fmt: skip
    whole = _lm(tmp_path / "whole", tmp_path / "t.txt", *flags)
    assert whole.exit_code == 0, whole.output
    save = lfm.core.train.save_checkpoint

    def save_then_die(run, acc, model, opt, step, hist):
        save(run, acc, model, opt, step, hist)
        raise RuntimeError(f"killed after the checkpoint at step {step}")

    monkeypatch.setattr(lfm.core.train, "save_checkpoint", save_then_die)
    cut = _lm(tmp_path / "cut", tmp_path / "t.txt", *flags)
    assert cut.exit_code == 1 and "step 2" in str(cut.exception)
    monkeypatch.setattr(lfm.core.train, "save_checkpoint", save)
    (run_dir,) = (tmp_path / "cut").iterdir()
    again = _lm(tmp_path / "cut", tmp_path / "t.txt", *flags, "--resume", str(run_dir))
    assert again.exit_code == 0, again.output
    got = load_file(str(run_dir / "student" / "model.safetensors"))
    (whole_run,) = (tmp_path / "whole").iterdir()
    want = load_file(str(whole_run / "student" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_uniform_tail_kl_against_the_explicit_distribution(temperature):
    from lfm.distill.served import uniform_tail_kl

    g = torch.Generator().manual_seed(0)
    vocab, k = 11, 3
    student = torch.randn(2, 4, vocab, generator=g)
    teacher = torch.randn(2, 4, vocab, generator=g).log_softmax(-1)
    values, ids = teacher.topk(k, -1)
    # the explicit p̃_t: top-k as sent, the rest of the mass spread evenly, then tempered
    tail = 1 - values.exp().sum(-1, keepdim=True)
    p = (tail / (vocab - k)).expand(2, 4, vocab).clone()
    p.scatter_(-1, ids, values.exp())
    log_q = (p.log() / temperature).log_softmax(-1)
    log_s = (student / temperature).log_softmax(-1)
    want = temperature**2 * (log_q.exp() * (log_q - log_s)).sum(-1).mean()
    got = uniform_tail_kl(student, (values, ids), temperature)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_the_uniform_tail_penalises_tail_mass_piled_on_one_token():
    """A bucket only matches the tail's total; spreading it evenly also judges its shape."""
    from lfm.distill.losses import TopKConfig, topk_kd_loss
    from lfm.distill.served import uniform_tail_kl

    vocab = 50
    p_t = torch.full((vocab,), 0.3 / 48)
    p_t[:2] = torch.tensor([0.5, 0.2])
    spread = p_t.log()[None]
    piled = torch.full((vocab,), 1e-9)
    piled[:2], piled[7] = torch.tensor([0.5, 0.2]), 0.3  # the same tail mass, on one token
    piled = (piled / piled.sum()).log()[None]
    top = p_t.log()[None].topk(2, -1)
    bucket = TopKConfig(k=2, residual=True)
    assert float(topk_kd_loss(piled, tuple(top), bucket)) < 1e-4  # the bucket sees no difference
    assert float(uniform_tail_kl(spread, tuple(top))) < 1e-5
    assert float(uniform_tail_kl(piled, tuple(top))) > 1.0


def test_cli_uld_across_tokenizers(tmp_path):
    """`lfm distill lm --method uld`: a tiny Gemma 3 teaches a student cut from a tiny Llama with
    another vocabulary; without --student it is one line."""
    from lfm.distill.xtok import STUDENT_CORPUS

    t_model, t_tok = tiny_lm("gemma3", 0)
    t_model.save_pretrained(tmp_path / "teacher")
    t_tok.save_pretrained(tmp_path / "teacher")
    s_model, s_tok = tiny_lm("llama", 1, corpus=STUDENT_CORPUS, vocab_size=300)
    s_model.save_pretrained(tmp_path / "family")
    s_tok.save_pretrained(tmp_path / "family")
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "runs", tmp_path / "t.txt", "--model", str(tmp_path / "teacher"),
              "--method", "uld", "--student", str(tmp_path / "family"))  # fmt: skip
    assert out.exit_code == 0, out.output
    run_dir, m = _manifest(tmp_path / "runs")
    assert m["status"] == "done" and m["metrics"]["aligned"] > 0 and m["metrics"]["student_ppl"] > 1
    assert m["config"]["temperature"] == 1.0 and m["inputs"]["student"]["sha256"]
    assert (run_dir / "student" / "tokenizer.json").is_file()
    missing = _lm(tmp_path / "runs2", tmp_path / "t.txt", "--model", str(tmp_path / "teacher"),
                  "--method", "uld")  # fmt: skip
    assert missing.exit_code == 2 and "uld needs --student" in missing.output


def test_gkd_spreads_the_teachers_tail_over_the_whole_vocabulary():
    """GKD's target is the teacher's top k and the rest of its mass spread evenly: it sums to one,
    keeps the k values, and judges tail mass piled on one token (which buckets cannot see)."""
    from lfm.distill.served import spread_tail

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 40, generator=g).log_softmax(-1)
    values, ids = teacher.topk(4, -1)
    full = spread_tail(values, ids, 40)
    assert torch.allclose(full.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.equal(full.gather(-1, ids), values)
    rest = full.exp().scatter(-1, ids, 0.0)
    assert torch.allclose(rest.max(-1).values * 36, rest.sum(-1), rtol=1e-4)  # evenly spread
    top = (values[:1, :2], ids[:1, :2])  # two positions scored (start 1 of 3 tokens)
    target = torch.cat([full[:1, :2], torch.zeros(1, 1, 40)], 1)  # the student is p̃ itself
    assert float(gkd_loss(target, top, 1, 0.5)) < 1e-5
    piled = torch.full_like(target, -30.0)
    piled.scatter_(-1, torch.cat([ids[:1, :2], ids[:1, :1]], 1), torch.cat([values[:1, :2],
                                                                           values[:1, :1]], 1))  # fmt: skip
    for t in range(2):  # the same top k; the whole tail on one token outside it
        other = next(j for j in range(40) if j not in ids[0, t].tolist())
        piled[0, t, other] = float(torch.log1p(-values[0, t].exp().sum()))
    assert float(gkd_loss(piled, top, 1, 0.5)) > 0.05


# -- FitNets' hint from a teacher served at HIDDEN ------------------------------------------


FITNETS = ("--method", "fitnets", "--hint-weight", "100", "--lr", "1e-2")


def test_cli_fitnets_served_equals_local(tmp_path, teacher, model_dir):
    """FitNets' hint through a server at HIDDEN gives the local run's student."""
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "local", tmp_path / "t.txt", "--model", str(model_dir), *FITNETS)
    assert out.exit_code == 0, out.output
    run_dir, m = _manifest(tmp_path / "local")
    assert m["status"] == "done" and m["metrics"]["hint"] == "model.layers.0"
    assert m["metrics"]["guided"] == "model.layers.0" and "teacher_ppl" in m["metrics"]
    assert (run_dir / "student" / "config.json").is_file()
    with running(build_app(Backend(teacher, "hidden"))) as url:
        out = _lm(tmp_path / "served", tmp_path / "t.txt", "--model", str(model_dir), *FITNETS,
                  "--teacher-url", url, "--hint", "model.layers.1")  # fmt: skip
        assert out.exit_code == 0, out.output
        same = _lm(tmp_path / "same", tmp_path / "t.txt", "--model", str(model_dir), *FITNETS,
                   "--teacher-url", url)  # fmt: skip
        assert same.exit_code == 0, same.output
    _, other = _manifest(tmp_path / "served")
    _, served = _manifest(tmp_path / "same")
    assert other["metrics"]["hint"] == "model.layers.1" and "teacher_ppl" not in served["metrics"]
    want = m["metrics"]["student_ppl"]
    assert served["metrics"]["student_ppl"] == pytest.approx(want, rel=1e-4)
    assert other["metrics"]["student_ppl"] != pytest.approx(want, rel=1e-4)


def test_cli_fitnets_refuses_a_student_of_another_vocabulary(tmp_path, model_dir):
    model, tok = tiny_lm("llama", 1, vocab_size=200)
    model.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    (tmp_path / "t.txt").write_text(TEXT)
    out = _lm(tmp_path / "runs", tmp_path / "t.txt", "--model", str(model_dir), *FITNETS,
              "--student", str(tmp_path / "small"))  # fmt: skip
    assert out.exit_code == 2 and not (tmp_path / "runs").exists()
    assert "need one tokenizer" in out.output and "--method uld" in out.output


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--hint", "model.layers.9"], "no module named model.layers.9"),
        (["--guided", "model.nope"], "no module named model.nope"),
        (
            ["--hint", "model.nrom", "--teacher-url", "HIDDEN"],
            "no module 'model.nrom' in the served",
        ),
    ],
)
def test_cli_fitnets_refuses_unknown_modules_before_any_run(tmp_path, model_dir, teacher, extra,
                                                           says):  # fmt: skip
    (tmp_path / "t.txt").write_text(TEXT)
    with running(build_app(Backend(teacher, "hidden"))) as url:
        extra = [url if e == "HIDDEN" else e for e in extra]
        out = _lm(
            tmp_path / "runs", tmp_path / "t.txt", "--model", str(model_dir), *FITNETS, *extra
        )
    assert out.exit_code == 2 and says in out.output, out.output
    assert not (tmp_path / "runs").exists()


def test_cli_cache_in_bfloat16_keeps_the_float32_answers_within_its_rounding(tmp_path, model_dir):
    from lfm.cli.distill import app

    (tmp_path / "t.txt").write_text(TEXT)
    got = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.npz"
        made = CliRunner().invoke(app, ["cache", "--model", str(model_dir), "--data",
                                        str(tmp_path / "t.txt"), "--top-k", "5", "--block-size",
                                        "16", "--batch-size", "2", "--steps", "3", "-o", str(out),
                                        "--threads", "1", "--device", "cpu", "--dtype", dtype])  # fmt: skip
        assert made.exit_code == 0, made.output
        with np.load(out) as f:
            got[dtype] = (f["values"].astype(np.float32), f["index"])
    (v32, i32), (v16, i16) = got["float32"], got["bfloat16"]
    assert not np.array_equal(v32, v16)  # the teacher ran in bfloat16
    assert (i32[..., 0] == i16[..., 0]).mean() > 0.9  # mostly the same best token
    assert np.abs(v32[..., 0] - v16[..., 0]).max() < 0.25


# -- what mutation testing found untested in topk_lm, gkd and student_samples -----------------


def _frozen():
    """A training config under which the student does not move (Adam's steps of ~1e-30 vanish
    in float32), so its samples depend on the batch alone."""
    return TrainConfig(steps=2, lr=1e-30, weight_decay=0.0, seed=3, progress=False)


def _greedy(model, prompts, new):
    """`new` argmax tokens after `prompts`, each from a forward pass over the whole sequence."""
    ids = prompts
    with torch.no_grad():
        for _ in range(new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def _ranks(model, seqs, start):
    """The rank of each token from `start` on under the model's own next-token distribution."""
    with torch.no_grad():
        logits = model(input_ids=seqs).logits[:, start - 1 : -1].float()
    return (logits > logits.gather(-1, seqs[:, start:, None])).sum(-1)


def test_a_topk_cache_shows_its_file_k_and_blocks(teacher, blocks, tmp_path):
    path = cache_topk(narrow(teacher, "scores"), blocks, 4, tmp_path / "c.npz")
    assert repr(TopKCache(path)) == f"TopKCache({str(path)!r}, k=4, blocks=8)"


def test_topk_lm_reports_its_k_shuffles_by_the_run_seed_evaluates_and_logs(teacher, blocks,
                                                                          tmp_path):  # fmt: skip
    from lfm.core.train import shuffled_batches
    from lfm.runs import Run

    spy, where = _Spy(narrow(teacher, "scores")), Run("t", root=tmp_path)
    res = run("distill/topk_lm", spy, _student(teacher), blocks, cfg={"k": 5, "batch_size": 2},
              train_cfg=TrainConfig(steps=3, lr=1e-2, seed=5, progress=False), run=where,
              evaluate=lambda m: {"val": 2.5})  # fmt: skip
    assert res.info == {"teacher_blocks": 6, "k": 5}
    want = shuffled_batches(blocks, batch_size=2, seed=5)  # the run's seed, not the default 0
    assert all(torch.equal(r, next(want)[0]) for r in spy.rows) and len(spy.rows) == 3
    assert res.history.evals == [{"step": 3, "val": 2.5}]
    logged = where.manifest["metrics"]
    assert logged["step"] == 3 and logged["val"] == 2.5 and {"kd", "lm", "loss"} <= logged.keys()


def test_gkd_refuses_a_student_of_a_smaller_vocabulary(teacher, blocks):
    from transformers import AutoModelForCausalLM

    cfg = teacher.model.config.__class__(**{**teacher.model.config.to_dict(), "vocab_size": 100})
    small = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match=r"student's vocabulary \(100\) is smaller.*\(320\)"):
        run("distill/gkd", narrow(teacher, "scores"), small, blocks, cfg={"k": 5})


def test_gkd_counts_batches_samples_whole_blocks_evaluates_and_logs_the_jsd(teacher, blocks,
                                                                            tmp_path):  # fmt: skip
    from lfm.core.train import shuffled_batches
    from lfm.runs import Run

    spy, where = _Spy(narrow(teacher, "scores")), Run("g", root=tmp_path)
    res = run("distill/gkd", spy, _student(teacher), blocks,
              cfg={"k": 5, "batch_size": 2, "on_policy": 1.0},
              train_cfg=TrainConfig(steps=3, lr=1e-2, seed=5, progress=False), run=where,
              evaluate=lambda m: {"val": 2.5})  # fmt: skip
    assert res.info == {"on_policy": 3, "batches": 3}
    want = shuffled_batches(blocks, batch_size=2, seed=5)  # the run's seed, not the default 0
    for rows in spy.rows:  # the prompt (first half) of the seed's batch, continued to 12 tokens
        assert rows.shape == (2, 12) and torch.equal(rows[:, :6], next(want)[0][:, :6])
    assert res.history.evals == [{"step": 3, "val": 2.5}]
    logged = where.manifest["metrics"]
    assert logged["step"] == 3 and logged["val"] == 2.5
    assert logged["jsd"] == pytest.approx(res.history.losses[-1])


def test_gkd_with_a_one_token_prompt_samples_from_the_second_token_on(teacher, blocks):
    from lfm.core.train import shuffled_batches

    spy = _Spy(narrow(teacher, "scores"))
    res = run("distill/gkd", spy, _student(teacher), blocks,
              cfg={"k": 5, "batch_size": 8, "on_policy": 1.0, "prompt_fraction": 0.1},
              train_cfg=TrainConfig(steps=1, lr=1e-2, seed=2, progress=False))  # fmt: skip
    assert res.info["on_policy"] == 1
    (rows,), (batch,) = spy.rows, next(shuffled_batches(blocks, batch_size=8, seed=2))
    assert torch.equal(rows[:, 0], batch[:, 0])  # int(12 · 0.1) = 1 prompt token
    assert (rows[:, 1] != batch[:, 1]).any()  # the second is the student's


def test_gkd_draws_each_batch_from_the_run_seed_and_its_tokens(teacher, blocks):
    """One block, so every batch is the same: whether it is on-policy is the run seed's draw for
    those tokens (`_batch_rng`), below λ; a draw equal to λ is not below it."""
    from lfm.distill.served import _batch_rng

    one = blocks[:1]
    draws = {s: float(torch.rand((), generator=_batch_rng(one, s))) for s in range(6)}
    assert {d < 0.5 for d in draws.values()} == {True, False}  # the seeds draw differently
    for s, d in draws.items():
        cfg = TrainConfig(steps=1, lr=1e-2, seed=s, progress=False)
        res = run("distill/gkd", narrow(teacher, "scores"), _student(teacher), one,
                  cfg={"k": 5, "batch_size": 1, "on_policy": 0.5}, train_cfg=cfg)  # fmt: skip
        assert res.info["on_policy"] == int(d < 0.5), s
    s, d = 0, draws[0]
    for lam, on in [(d, 0), (math.nextafter(d, 1.0), 1)]:
        res = run("distill/gkd", narrow(teacher, "scores"), _student(teacher), one,
                  cfg={"k": 5, "batch_size": 1, "on_policy": lam},
                  train_cfg=TrainConfig(steps=1, lr=1e-2, seed=s, progress=False))  # fmt: skip
        assert res.info["on_policy"] == on, lam


def test_gkd_samples_a_batch_alike_wherever_it_comes_in_the_run(teacher, blocks):
    """The student's sample of a batch comes from the seed and the batch's tokens, not from the
    global RNG or the step: two blocks in either order (so the batches come in either order) give
    the same samples for the same block, the student kept still."""
    got = []
    for data in (blocks[:2], blocks[:2].flip(0)):
        spy = _Spy(narrow(teacher, "scores"))
        run("distill/gkd", spy, _student(teacher), data,
            cfg={"k": 5, "batch_size": 1, "on_policy": 1.0}, train_cfg=_frozen())  # fmt: skip
        got.append(spy.rows)
    (a1, a2), (b1, b2) = got
    assert torch.equal(a1[:, :6], b2[:, :6]) and torch.equal(a2[:, :6], b1[:, :6])
    assert torch.equal(a1, b2) and torch.equal(a2, b1)
    texts = {tuple(b[:6].tolist()): b for b in blocks[:2]}
    assert not any(torch.equal(r[0], texts[tuple(r[0, :6].tolist())]) for r in (a1, a2))  # sampled


def test_gkd_samples_at_its_temperature(teacher, blocks):
    """At a temperature near zero the student's sample is its argmax continuation."""
    spy = _Spy(narrow(teacher, "scores"))
    student = _student(teacher)
    with torch.no_grad():
        student.lm_head.weight.mul_(8)  # clear argmaxes
    want = {}
    for b in blocks:
        want[tuple(b[:6].tolist())] = _greedy(student.eval(), b[None, :6], 6)[0]
    run("distill/gkd", spy, student, blocks,
        cfg={"k": 5, "batch_size": 4, "on_policy": 1.0, "temperature": 1e-4},
        train_cfg=_frozen())  # fmt: skip
    for rows in spy.rows:
        for r in rows:
            assert torch.equal(r, want[tuple(r[:6].tolist())])


def test_student_samples_range_over_the_whole_vocabulary_whatever_its_generation_config():
    """Sampling at T = 1 with no top-k or top-p cut, even for a student whose own generation
    config is greedy, top-1, nucleus 0.01 and cold: the tokens drawn from a near-uniform tiny
    model land on every rank."""
    from lfm.distill.served import student_samples

    student = tiny_lm("llama", 0)[0]
    gen = student.generation_config
    gen.do_sample, gen.top_k, gen.top_p, gen.temperature = False, 1, 0.01, 0.01
    prompts = torch.randint(3, 300, (4, 3), generator=torch.Generator().manual_seed(0))
    out = student_samples(student.train(), prompts, 10, 1.0, seed=0)
    assert out.shape == (4, 13) and torch.equal(out[:, :3], prompts) and student.training
    ranks = _ranks(student, out, 3)
    assert int(ranks.max()) >= 100 and (ranks > 0).float().mean() > 0.8, ranks


def test_student_samples_at_low_temperature_are_the_argmax_over_the_whole_prompt():
    """Prompts led by token 0 (BOS here; the `pad_token_id` given to `generate`, from which it
    would infer a mask that hides them): every prompt token is attended, so the cold sample is
    the argmax continuation of the whole prompt. The student's attention outputs are amplified
    so that the context shows in its argmax."""
    from lfm.distill.served import student_samples

    student = tiny_lm("llama", 0)[0].eval()
    with torch.no_grad():
        student.lm_head.weight.mul_(8)
        for layer in student.model.layers:
            layer.self_attn.o_proj.weight.mul_(20)
    g = torch.Generator().manual_seed(1)
    prompts = torch.cat([torch.zeros(3, 3, dtype=torch.long),
                         torch.randint(3, 300, (3, 3), generator=g)], 1)  # fmt: skip
    got = student_samples(student, prompts, 5, 1e-4, seed=0)
    assert torch.equal(got, _greedy(student, prompts, 5))


def test_student_samples_are_exactly_new_tokens_with_eos_held_back():
    """A student that would end every row at once (EOS boosted): still exactly `new` tokens,
    none of them EOS, so no row is padded."""
    from lfm.distill.served import student_samples

    student = tiny_lm("llama", 0)[0].eval()
    eos = student.generation_config.eos_token_id
    boost = torch.zeros(student.config.vocab_size)
    boost[eos] = 30.0
    student.lm_head.register_forward_hook(lambda mod, inp, out: out + boost)
    prompts = torch.randint(3, 300, (3, 4), generator=torch.Generator().manual_seed(2))
    out = student_samples(student, prompts, 6, 1.0, seed=0)
    assert out.shape == (3, 10) and torch.equal(out[:, :4], prompts)
    assert (out[:, 4:] != eos).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_student_samples_on_cuda_leave_that_devices_rng_as_they_found_it():
    from lfm.distill.served import student_samples

    student = tiny_lm("llama", 0)[0].cuda()
    prompts = torch.randint(3, 300, (2, 3), device="cuda")
    before = torch.cuda.get_rng_state(prompts.device)
    cpu = torch.get_rng_state()
    student_samples(student, prompts, 4, 1.0, seed=123)
    assert torch.equal(torch.cuda.get_rng_state(prompts.device), before)
    assert torch.equal(torch.get_rng_state(), cpu)


def test_gkd_samples_batches_that_share_a_prompt_independently(teacher):
    """62 one-block batches with one prompt and their own texts, the student kept still: each
    batch's sampling seed is its own (drawn from 2³¹ − 1), so no two samples coincide."""
    g = torch.Generator().manual_seed(4)
    data = torch.randint(3, 300, (62, 12), generator=g)
    data[:, :6] = data[0, :6]
    spy = _Spy(narrow(teacher, "scores"))
    res = run("distill/gkd", spy, _student(teacher), data,
              cfg={"k": 1, "batch_size": 1, "on_policy": 1.0},
              train_cfg=_frozen().replace(steps=62))  # fmt: skip
    assert res.info == {"on_policy": 62, "batches": 62}
    assert len({tuple(r[0, 6:].tolist()) for r in spy.rows}) == 62
