"""What mutation testing of the distill area found untested: the top-k LM loss's weights,
temperature and tail options, and the tail KL at T ≠ 1 when the whole vocabulary is sent. Every
expected value is computed here from the definitions, not by the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from lfm.distill.served import TopKLMConfig, topk_lm_loss, uniform_tail_kl

V, K = 7, 3


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 5), generator=g)
    student = torch.randn(2, 5, V, generator=g)  # logits (B, T, V)
    teacher_logp = torch.randn(2, 4, V, generator=g).log_softmax(-1)  # positions 0 … T-2
    values, index = teacher_logp.topk(K, -1)
    return ids, student, teacher_logp, (values, index)


def _nll(student, ids):
    logp = student[:, :-1].log_softmax(-1)
    return -logp.gather(-1, ids[:, 1:, None]).mean()


def _spread(values, index):
    """The teacher's distribution with the mass outside its top k spread evenly: (…, V)."""
    rest = (1 - values.exp().sum(-1, keepdim=True)) / (V - K)
    return rest.expand(*values.shape[:-1], V).clone().scatter(-1, index, values.exp())


def test_total_is_the_weighted_sum_of_kd_and_lm(case):
    ids, student, _, teacher = case
    cfg = TopKLMConfig(k=K, kd_weight=3.0, lm_weight=0.5)
    out = topk_lm_loss(student, teacher, ids, cfg)
    torch.testing.assert_close(out["lm"], _nll(student, ids))
    torch.testing.assert_close(out["loss"], 3.0 * out["kd"] + 0.5 * out["lm"])


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_uniform_tail_is_the_full_kl_of_the_spread_teacher_at_temperature(case, t):
    ids, student, _, (values, index) = case
    p = _spread(values, index).pow(1 / t)
    p = p / p.sum(-1, keepdim=True)  # tempered: p^(1/T), normalised
    log_s = (student[:, :-1] / t).log_softmax(-1)
    want = t * t * (p * (p.log() - log_s)).sum(-1).mean()
    got = topk_lm_loss(student, (values, index), ids, TopKLMConfig(k=K, temperature=t))["kd"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bucket_and_drop_tails_are_their_own_losses(case):
    ids, student, _, (values, index) = case
    z = student[:, :-1]
    p_top = values.exp()
    # "drop": both sides renormalised over the teacher's top k
    q = p_top / p_top.sum(-1, keepdim=True)
    s = z.gather(-1, index).log_softmax(-1)
    drop = (q * (q.log() - s)).sum(-1).mean()
    # "bucket": a (k+1)-th class holding the rest on each side
    qb = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    ps = z.softmax(-1)
    sb = ps.gather(-1, index)
    sb = torch.cat([sb, 1 - sb.sum(-1, keepdim=True)], -1)
    bucket = (qb * (qb.log() - sb.log())).sum(-1).mean()
    for tail, want in (("drop", drop), ("bucket", bucket)):
        got = topk_lm_loss(student, (values, index), ids, TopKLMConfig(k=K, tail=tail))["kd"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(drop), float(bucket), rel_tol=1e-3)


def test_whole_vocabulary_sent_at_temperature_two(case):
    _, student, teacher_logp, _ = case
    values, index = teacher_logp.topk(V, -1)  # k = V: nothing outside
    t = 2.0
    q = (teacher_logp / t).log_softmax(-1)
    s = (student[:, :-1] / t).log_softmax(-1)
    want = t * t * (q.exp() * (q - s)).sum(-1).mean()
    got = uniform_tail_kl(student[:, :-1], (values, index), t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(got), float(uniform_tail_kl(student[:, :-1], (values, index))))


def test_drop_tail_at_temperature_two(case):
    ids, student, _, (values, index) = case
    t = 2.0
    q = (values / t).log_softmax(-1)  # the top k renormalised at T
    s = (student[:, :-1].gather(-1, index) / t).log_softmax(-1)
    want = t * t * (q.exp() * (q - s)).sum(-1).mean()
    got = topk_lm_loss(student, (values, index), ids, TopKLMConfig(k=K, tail="drop", temperature=t))
    torch.testing.assert_close(got["kd"], want, rtol=1e-5, atol=1e-6)


def test_top_k_mass_rounded_past_one_gives_the_top_k_kl(case):
    """An API's rounded log-probabilities can sum past 1 (no mass left outside the top k): the
    loss stays finite and is the KL on the top k, the tail taking the smallest mass allowed."""
    _, student, _, _ = case
    p = torch.tensor([0.6, 0.3, 0.10001])  # sums to 1.00001
    values = p.log().expand(2, 4, K).clone()
    index = torch.tensor([0, 1, 2]).expand(2, 4, K).clone()
    z = student[:, :-1]
    got = uniform_tail_kl(z, (values, index))
    q = p / p.sum()
    log_s = z.log_softmax(-1).gather(-1, index)
    want = (q * (q.log() - log_s)).sum(-1).mean()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


class Fixed:
    """A teacher answering a fixed top-k for any rows, and counting the rows it was asked."""

    name = "fixed-teacher"

    def __init__(self, v: int = V):
        self.v, self.asked = v, 0

    def top_logprobs(self, rows, k):
        rows = torch.as_tensor(rows)
        self.asked += 1
        logp = torch.arange(self.v, dtype=torch.float32).expand(*rows.shape, self.v)
        values, index = logp.log_softmax(-1).topk(k, -1)
        return values, index


def test_a_teacher_cache_records_what_made_it_and_reads_back(tmp_path, capsys):
    import json

    import numpy as np

    from lfm.distill.served import CACHE_VERSION, TopKCache, cache_topk
    from lfm.errors import ConfigError

    blocks = torch.randint(0, V, (5, 6), generator=torch.Generator().manual_seed(1))
    teacher = Fixed()
    path = cache_topk(teacher, blocks, K, tmp_path / "c.npz", batch_size=2)
    assert teacher.asked == 3 and capsys.readouterr().err == ""  # 5 blocks by 2; no bar asked
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
    assert meta == {"version": CACHE_VERSION, "k": K, "teacher": "fixed-teacher", "blocks": 5,
                    "block_size": 6}  # fmt: skip
    cache = TopKCache(path)
    assert cache.name == "cache of fixed-teacher" and cache.k == K and len(cache) == 5
    values, index = cache.top_logprobs(blocks[3:4], 2)
    want_v, want_i = Fixed().top_logprobs(blocks[3:4], 2)
    assert torch.equal(index, want_i)
    torch.testing.assert_close(values, want_v, atol=2e-3, rtol=0)  # stored in float16
    cache_topk(teacher, blocks, K, tmp_path / "d.npz", batch_size=2, progress=True)
    assert "teacher top-k" in capsys.readouterr().err  # the bar, when asked for
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a cache")
    with pytest.raises(ConfigError, match=f"{bad} is not a teacher cache"):
        TopKCache(bad)
    old = tmp_path / "old.npz"
    with np.load(path, allow_pickle=False) as f:
        parts = dict(f)
    parts["meta"] = np.array(json.dumps({**meta, "version": CACHE_VERSION + 1}))
    np.savez(old, **parts)
    with pytest.raises(ConfigError, match=f"{old} is a teacher cache of another version"):
        TopKCache(old)
