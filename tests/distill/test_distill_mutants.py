"""What mutation testing of the distill area found untested: the top-k LM loss's weights,
temperature and tail options, and the tail KL at T ≠ 1 when the whole vocabulary is sent; the
cross-tokenizer loss's parts, options and data helpers; what sequence KD asks a text teacher; the
feature losses' kernels and devices; Pearson distance on any shape; what the teacher cache
takes, records and refuses, and how GKD seeds each batch's draws; reverse KL, residual top-k KD
and DIST at a temperature other than 1. Every expected value is computed here from the
definitions, not by the code under test."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lfm.access import Access, LocalModel
from lfm.distill.features import _pkt_probs, attention_map, pkt_loss
from lfm.distill.losses import pearson_distance
from lfm.distill.seqkd import _ask, teacher_generations
from lfm.distill.served import (
    TopKCache,
    TopKLMConfig,
    _batch_rng,
    cache_topk,
    topk_lm_loss,
    uniform_tail_kl,
)
from lfm.distill.xtok import (
    ULDConfig,
    check_vocabularies,
    decoded_boundaries,
    held_out_blocks,
    layer_dropped,
    make_loss_fn,
    masked_lm_loss,
    shared_vocab,
    text_blocks,
    uld_distance,
    xtok_loss,
)
from lfm.errors import ConfigError, LfmError

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


# -- cross-tokenizer distillation (xtok) ----------------------------------------------------


def _logp(*probs):
    return torch.tensor(probs).log()


def test_uld_distance_takes_rows_of_any_leading_shape():
    # p sorted (.5, .3, .2) against q (.6, .4, 0): .1 + .1 + .2 = .4; p (.7, .2, .1) against
    # q (.5, .5, 0): .2 + .3 + .1 = .6; p (.4, .4, .2) against q (.6, .4, 0): .2 + 0 + .2 = .4
    s = torch.stack([_logp(0.2, 0.5, 0.3), _logp(0.1, 0.2, 0.7), _logp(0.4, 0.2, 0.4)])
    t = torch.stack([_logp(0.4, 0.6), _logp(0.5, 0.5), _logp(0.6, 0.4)])
    want = (0.4 + 0.6 + 0.4 + 0.4) / 4
    s4, t4 = torch.cat([s, s[:1]]).view(2, 2, 3), torch.cat([t, t[:1]]).view(2, 2, 2)
    torch.testing.assert_close(uld_distance(s4, t4), torch.tensor(want))


def test_shared_vocab_with_nothing_in_common_gives_empty_index_tensors():
    t_ids, s_ids = shared_vocab(["a", "b"], ["c", ""])
    assert t_ids.dtype == s_ids.dtype == torch.long and len(t_ids) == len(s_ids) == 0
    assert torch.zeros(2, 3)[:, t_ids].shape == (2, 0)  # usable as an index


def test_masked_lm_loss_scores_real_tokens_only():
    # row 0: three real tokens, labels 1, 1; row 1: the last token is padding (mask 0)
    ids = torch.tensor([[0, 1, 1], [0, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = torch.stack([
        torch.stack([_logp(0.5, 0.5), _logp(0.75, 0.25), _logp(0.5, 0.5)]),
        torch.stack([_logp(0.2, 0.8), _logp(0.1, 0.9), _logp(0.5, 0.5)]),
    ])  # fmt: skip
    want = -(math.log(0.5) + math.log(0.25) + math.log(0.8)) / 3
    torch.testing.assert_close(masked_lm_loss(logits, ids, mask), torch.tensor(want))


def test_xtok_loss_passes_top_k_and_temperature_and_leaves_out_a_weightless_kl():
    # p (.5, .4, .1) against q (.5, .25, .25): exact ULD .15 + .15 = .3; with top_k = 1 the
    # tails (.5 against .5) count as equal: 0
    s, t = _logp(0.5, 0.4, 0.1)[None], _logp(0.25, 0.5, 0.25)[None]
    shared = (torch.tensor([0, 1]), torch.tensor([1, 2]))
    lm = torch.tensor(2.0)
    out = xtok_loss(s, t, lm, shared, ULDConfig(shared_kl_weight=0, lm_weight=1.0))
    assert set(out) == {"loss", "lm", "uld"}  # α_∩ = 0: ULD only, no KL computed or reported
    torch.testing.assert_close(out["uld"], torch.tensor(0.3))
    torch.testing.assert_close(out["loss"], torch.tensor(2.0 + 1.5 * 0.3))
    out = xtok_loss(s, t, lm, shared, ULDConfig(top_k=1, shared_kl_weight=0))
    torch.testing.assert_close(out["uld"], torch.tensor(0.0))
    # KL_∩ at T = 2: teacher ids 0, 1 (.25, .5), student ids 1, 2 (.4, .1), each tempered
    # (p^(1/2)) and renormalised over the two
    q = torch.tensor([0.25, 0.5]).sqrt()
    p = torch.tensor([0.4, 0.1]).sqrt()
    q, p = q / q.sum(), p / p.sum()
    want = 4 * (q * (q / p).log()).sum()
    out = xtok_loss(s, t, lm, shared, ULDConfig(temperature=2.0, uld_weight=0, lm_weight=0))
    torch.testing.assert_close(out["kl"], want)
    torch.testing.assert_close(out["loss"], want)


class FixedLM(nn.Module):
    """A 'student' whose logits are given: (B, L, V) whatever the ids."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits)


class PromptTeacher:
    """A SCORES handle answering every prompt with (.5, .5) and recording the prompts."""

    access = Access.SCORES
    vocab_size = 2

    def __init__(self):
        self.prompts = []

    def next_token_logprobs(self, prompts):
        self.prompts += prompts
        return _logp(0.5, 0.5).expand(len(prompts), 2)


def _batch(pairs):
    ids = torch.tensor([[0, 1, 2]])
    return ids, torch.ones_like(ids), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1,
            dtype=torch.long), torch.tensor([pairs]), torch.tensor([0])  # fmt: skip


def test_the_loss_function_asks_the_teacher_at_the_aligned_text_and_weighs_each_part():
    # one text "abc", one aligned boundary b = 2 at the student's token 1: the teacher is asked
    # for "ab"; student (.7, .2, .1) against (.5, .5): ULD .2 + .3 + .1 = .6
    logits = torch.stack([_logp(0.7, 0.2, 0.1)] * 3)[None]
    teacher = PromptTeacher()
    cfg = ULDConfig(uld_weight=2.0, shared_kl_weight=0, lm_weight=0)
    shared = (torch.tensor([0]), torch.tensor([0]))
    out = make_loss_fn(teacher, ["abc"], shared, cfg)(FixedLM(logits), _batch([[2, 0, 1]]))
    assert teacher.prompts == ["ab"] and "kl" not in out
    torch.testing.assert_close(out["uld"], torch.tensor(0.6))
    torch.testing.assert_close(out["loss"], torch.tensor(1.2))


def test_a_batch_with_nothing_aligned_gives_the_weighted_lm_loss_alone():
    # tokens 0, 1, 2: positions 0, 1 give p(1) = .2 and p(2) = .1
    logits = torch.stack([_logp(0.7, 0.2, 0.1)] * 3)[None]
    teacher = PromptTeacher()
    loss_fn = make_loss_fn(teacher, ["abc"], (torch.tensor([0]), torch.tensor([0])),
                           ULDConfig(lm_weight=0.5))  # fmt: skip
    out = loss_fn(FixedLM(logits), _batch([[-1, -1, -1]]))
    lm = -(math.log(0.2) + math.log(0.1)) / 2
    assert set(out) == {"loss", "lm"} and teacher.prompts == []
    torch.testing.assert_close(out["lm"], torch.tensor(lm))
    torch.testing.assert_close(out["loss"], torch.tensor(0.5 * lm))


class CharTokenizer:
    """One token per character (its code point), BOS = 1 first when asked for special tokens
    (unless `bos` is off) and EOS = 2 last when `eos` is on: a tokenizer with offsets and no
    files."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, bos: bool = True, eos: bool = False):
        self.bos, self.eos = bos, eos

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        lead = [1] if self.bos and add_special_tokens else []
        end = [2] if self.eos and add_special_tokens else []
        offsets = (
            [(0, 0)] * len(lead) + [(i, i + 1) for i in range(len(text))] + [(0, 0)] * len(end)
        )
        return {"input_ids": lead + [ord(c) for c in text] + end, "offset_mapping": offsets}


def test_text_blocks_are_exactly_block_size_tokens_up_to_the_text_end():
    assert text_blocks(CharTokenizer(), ["abcdef", "ghijk"], 3) == ["abc", "def", "ghi"]


def test_held_out_blocks_are_n_blocks_of_size_led_by_bos_when_the_tokenizer_adds_one():
    a, b, c = (ord(x) for x in "abc")
    texts = ["abcd", "ef"]  # a b c d EOS e f EOS: two blocks of 3, one asked for
    got = held_out_blocks(CharTokenizer(), texts, 3, 1)
    assert got.dtype == torch.long and got.tolist() == [[1, a, b, c]]
    got = held_out_blocks(CharTokenizer(bos=False), texts, 3, 1)
    assert got.dtype == torch.long and got.tolist() == [[a, b, c]]
    # a tokenizer that also appends EOS encodes "" as [BOS, EOS]: the lead is still BOS alone
    assert held_out_blocks(CharTokenizer(eos=True), texts, 3, 1)[:, 0].tolist() == [1]
    assert held_out_blocks(CharTokenizer(eos=True), texts, 3, 1).shape == (1, 4)


def test_decoded_boundaries_keep_only_nonempty_prefixes_of_the_text():
    # BOS decodes to "" (closes nothing), and a decoder spelling "ab" as "ax" closes nothing
    pieces = {(7,): "", (7, 8): "a", (7, 8, 9): "ax", (7, 8, 9, 10): "abc"}
    assert decoded_boundaries([7, 8, 9, 10], lambda ids: pieces[tuple(ids)], "abc") == {1: 1, 3: 3}


def _four_block_llama() -> LocalModel:
    from transformers import AutoModelForCausalLM

    from lfm.core.tiny import tiny_config

    cfg = tiny_config("llama", 16)
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return LocalModel(model, SimpleNamespace(pad_token_id=0), name="m")


def test_layer_dropped_keeps_every_kth_block_from_offset_zero_and_names_the_student():
    teacher = _four_block_llama()
    blocks = teacher.model.model.layers

    def kept(student):
        return [[torch.equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight)
                 for t in blocks].index(True) for s in student.model.model.layers]  # fmt: skip

    student = layer_dropped(teacher, every=2)
    assert kept(student) == [0, 2] and student.name == "m-every2"
    assert student.tokenizer is teacher.tokenizer
    assert kept(layer_dropped(teacher, every=2, offset=1)) == [1, 3]
    teacher.tokenizer = None
    with pytest.raises(ConfigError, match=r"^the student needs its tokenizer"):
        layer_dropped(teacher, every=2)


def test_one_vocabulary_on_both_sides_points_to_lm_student():
    model = SimpleNamespace(vocab_size=3, decode=lambda ids: "abc"[ids[0]])
    want = ("teacher and student have the same vocabulary: distil with lm_student (`lfm distill "
            "lm`), which compares the two distributions token for token")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_vocabularies(model, model)
    assert str(e.value) == want


# -- sequence KD: what the text teacher is asked ---------------------------------------------


class PlainTextTeacher:
    """A TEXT handle as the protocol has it: `generate(prompts, max_new_tokens)`, no temperature."""

    access = Access.TEXT

    def __init__(self):
        self.asked = []

    def generate(self, prompts, max_new_tokens=32):
        self.asked.append((list(prompts), max_new_tokens))
        return [f" {p} " for p in prompts]


class SamplingTextTeacher(PlainTextTeacher):
    def generate(self, prompts, max_new_tokens=32, **kw):
        self.asked.append((list(prompts), max_new_tokens, kw))
        return list(prompts)


def test_greedy_generation_asks_without_a_temperature_and_sampling_passes_it():
    plain = PlainTextTeacher()
    assert teacher_generations(plain, ["a"], 5) == [" a "]
    assert teacher_generations(plain, ["b"], 6, temperature=0.0) == [" b "]
    assert plain.asked == [(["a"], 5), (["b"], 6)]
    sampling = SamplingTextTeacher()
    teacher_generations(sampling, ["c"], 7, temperature=0.7)
    assert sampling.asked == [(["c"], 7, {"temperature": 0.7})]


def test_step_by_step_asks_the_teacher_greedily_with_its_template_and_length():
    plain = PlainTextTeacher()
    assert _ask(plain, "{input}?", ["x", "y"], 9) == ["x?", "y?"]  # stripped
    assert plain.asked == [(["x?", "y?"], 9)]


# -- feature losses ----------------------------------------------------------------------------


def test_attention_map_normalises_each_example_with_p_two_by_default():
    # one channel, 1×2 maps: Q = (1, 4) and (9, 16) at p = 2; rows of unit norm
    a = torch.tensor([[[[1.0, 2.0]]], [[[-3.0, 4.0]]]])
    want = torch.tensor([[1.0, 4.0], [9.0, 16.0]])
    want = want / want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(attention_map(a), want)


def test_pkt_probabilities_divide_the_kernel_by_each_rows_sum():
    # e0 ⊥ e1, e2 at 45° to both: K01 = 1/2, K02 = K12 = (1 + 1/√2)/2 = c
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = (1 + 1 / math.sqrt(2)) / 2
    k = torch.tensor([[0, 0.5, c], [0.5, 0, c], [c, c, 0]])
    torch.testing.assert_close(_pkt_probs(e, 1e-7), k / k.sum(1, keepdim=True))
    # a row sum below eps is replaced by eps: the kernel value itself shows, (0 + 1)/2 for ⊥
    got = _pkt_probs(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), eps=1.0)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5], [0.5, 0.0]]))


def test_pkt_builds_its_masks_on_the_features_device():
    e = torch.zeros(3, 4, device="meta")  # stands for an accelerator: a CPU mask would not mix
    assert _pkt_probs(e, 1e-7).device.type == "meta"
    assert pkt_loss(e, e).device.type == "meta"


# -- Pearson distance --------------------------------------------------------------------------


def test_pearson_distance_runs_along_the_last_dimension_of_any_shape():
    a = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 0.0, 2.0]]])  # (1, 2, 3)
    b = torch.tensor([[[3.0, 2.0, 1.0], [2.0, 0.0, 4.0]]])
    # reversed: correlation −1, distance 2; doubled: correlation 1, distance 0
    torch.testing.assert_close(pearson_distance(a, b), torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(pearson_distance(a[0, 0], b[0, 0]), torch.tensor(2.0))


def test_pearson_distance_of_nearly_constant_rows_adds_eps_to_the_norms():
    # centred (1e-4, −1e-4) twice: a·b = ‖a‖‖b‖ = 2e-8, so 1 − 2e-8 / (2e-8 + 1e-8) = 1/3
    a = torch.tensor([1e-4, -1e-4], dtype=torch.float64)
    torch.testing.assert_close(pearson_distance(a, a), torch.tensor(1 / 3, dtype=torch.float64))


# -- the teacher cache's inputs and records; GKD's batch draws ----------------------------------


class Echo:
    """A teacher whose top k at each position are the token there and the k − 1 after it (mod V),
    with log-probabilities log 1/2, log 1/4, log 1/8: each row its own answer."""

    name = "echo"

    def top_logprobs(self, rows, k):
        index = (torch.as_tensor(rows)[..., None] + torch.arange(k)) % V
        return torch.tensor([0.5, 0.25, 0.125][:k]).log().expand(index.shape), index


ROWS = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1], [2, 2, 2, 2]])


@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays")
def test_the_cache_answers_rows_given_as_lists_or_as_an_array_of_any_layout(tmp_path):
    cache = TopKCache(cache_topk(Echo(), ROWS, K, tmp_path / "c.npz"))
    # rows 2, 0: ids (2, 3, 4) at every token of row 2, then (1, 2, 3), (2, 3, 4), … for row 0
    want_i = [[[2, 3, 4]] * 4, [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]]]
    want_v = torch.tensor([0.5, 0.25, 0.125]).log().expand(2, 4, K)
    for rows in ([[2, 2, 2, 2], [1, 2, 3, 4]], ((2, 2, 2, 2), (1, 2, 3, 4))):
        values, index = cache.top_logprobs(rows, K)
        assert index.dtype == torch.long and index.tolist() == want_i
        assert values.dtype == torch.float32
        torch.testing.assert_close(values, want_v, atol=2e-3, rtol=0)  # stored in float16
    # rows 2, 1 as NumPy's view with a negative stride, which a local teacher takes too
    backwards = ROWS.numpy()[::-1][:2]
    _, index = cache.top_logprobs(backwards, 2)
    assert index.tolist() == [[[2, 3]] * 4, [[5, 6], [6, 0], [0, 1], [1, 2]]]


def test_a_block_not_in_the_cache_is_refused_naming_the_likely_causes(tmp_path):
    path = cache_topk(Echo(), ROWS, K, tmp_path / "c.npz")
    with pytest.raises(ConfigError) as e:
        TopKCache(path).top_logprobs([[1, 2, 3, 5]], K)
    assert str(e.value) == (f"a block is not in the cache {path}: it was made from other text, "
                            "block size or tokenizer")  # fmt: skip


class Unnamed:
    """A teacher with no `name`."""

    def top_logprobs(self, rows, k):
        return Echo().top_logprobs(rows, k)

    def __str__(self):
        return "an unnamed teacher"


def test_a_cache_of_a_teacher_without_a_name_records_the_teacher_as_text(tmp_path):
    import json

    import numpy as np

    path = cache_topk(Unnamed(), ROWS, K, tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as f:
        assert json.loads(str(f["meta"]))["teacher"] == "an unnamed teacher"
    assert TopKCache(path).name == "cache of an unnamed teacher"


def test_a_batch_draws_the_same_for_the_same_tokens_and_seed_and_otherwise_not():
    """GKD's on-policy draws are reproducible per batch (resume, any order of batches) and
    depend on both the run's seed and the batch's tokens."""
    ids = torch.tensor([[3, 1, 2]])
    want = torch.rand(5, generator=_batch_rng(ids, 15))
    assert torch.equal(torch.rand(5, generator=_batch_rng(ids.clone(), 15)), want)
    assert not torch.equal(torch.rand(5, generator=_batch_rng(ids, 16)), want)
    assert not torch.equal(torch.rand(5, generator=_batch_rng(ids.flip(1), 15)), want)
    assert not torch.equal(torch.rand(5, generator=_batch_rng(ids[:, :2], 15)), want)


# -- GKD's divergence, the teacher's tail and answers; the student's vocabulary; FitNets' r -------


def test_the_generalised_jsd_is_a_mean_over_rows_at_every_beta():
    from lfm.distill.served import generalised_jsd

    # row 0: p_t = (1/2, 1/2), p_s = (1/4, 3/4); row 1: both (1/2, 1/2), every divergence 0
    log_t = _logp([0.5, 0.5], [0.5, 0.5])
    log_s = _logp([0.25, 0.75], [0.5, 0.5])
    # β = 0: KL(p_t ‖ p_s) = ½ ln 2 + ½ ln ⅔ = ½ ln 4/3 on row 0
    torch.testing.assert_close(
        generalised_jsd(log_t, log_s, 0.0), torch.tensor(math.log(4 / 3) / 4)
    )
    # β = 1: KL(p_s ‖ p_t) = ¼ ln ½ + ¾ ln 3/2 on row 0
    reverse = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    torch.testing.assert_close(generalised_jsd(log_t, log_s, 1.0), torch.tensor(reverse / 2))
    # β = ½: m = (3/8, 5/8) on row 0
    kl_t = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    kl_s = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    want = (0.5 * kl_t + 0.5 * kl_s) / 2
    torch.testing.assert_close(generalised_jsd(log_t, log_s, 0.5), torch.tensor(want))


def test_the_spread_tail_stays_finite_when_the_top_k_mass_is_rounded_past_one():
    """The teacher's tail then takes the smallest mass allowed, 1e-6, shared by the V − k others."""
    from lfm.distill.served import spread_tail

    values = torch.tensor([0.6, 0.3, 0.10001]).log()  # sums to 1.00001
    got = spread_tail(values, torch.tensor([4, 0, 2]), V)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[[4, 0, 2]], values)
    tail = got[[1, 3, 5, 6]]
    torch.testing.assert_close(tail, torch.full((4,), math.log(1e-6 / 4)), atol=0.02, rtol=0)


def test_gkd_loss_moves_the_teachers_answers_to_the_logits_device():
    from lfm.distill.served import gkd_loss

    student = torch.zeros(1, 4, V, device="meta")  # stands for an accelerator
    values, index = torch.zeros(1, 3, V).log_softmax(-1).topk(K, -1)  # answered on the CPU
    assert gkd_loss(student, (values, index), 2, 0.5).device.type == "meta"


class Short(Fixed):
    """A teacher sending one log-probability fewer than asked."""

    def top_logprobs(self, rows, k):
        return super().top_logprobs(rows, k - 1)


def test_a_teacher_sending_fewer_than_k_is_refused_with_the_count_it_sent():
    from lfm.distill.served import teacher_topk
    from lfm.errors import LfmError

    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(LfmError) as e:
        teacher_topk(Short(), ids, K)
    assert str(e.value) == "the teacher sent 2 log-probabilities per token, not 3"


class Answer:
    """A teacher's answer standing for a tensor on another device: it records where it is moved."""

    shape = (1, 4, K)

    def __init__(self):
        self.device = "the teacher's"

    def to(self, device):
        self.device = device
        return self


class Remote:
    name = "remote"

    def top_logprobs(self, rows, k):
        return Answer(), Answer()


def test_the_teachers_answers_are_moved_to_the_ids_device():
    from lfm.distill.served import teacher_topk

    ids = torch.zeros(1, 5, dtype=torch.long)
    values, index = teacher_topk(Remote(), ids, K)
    assert values.device == index.device == ids.device


class Unreadable:
    """A vocabulary size that cannot be read (a served model's card out of reach)."""

    def __int__(self):
        raise OSError("no card")


def test_a_smaller_student_vocabulary_is_refused_and_an_unreadable_teacher_size_is_not_checked():
    from lfm.distill.served import _same_vocab

    student = SimpleNamespace(get_output_embeddings=lambda: nn.Linear(4, 5))  # vocabulary 5
    with pytest.raises(ConfigError) as e:
        _same_vocab(SimpleNamespace(vocab_size=6), student)
    assert str(e.value) == (
        "the student's vocabulary (5) is smaller than the teacher's (6): top-k KD needs one "
        "vocabulary; for another tokenizer use distill/uld"
    )
    for teacher in (
        SimpleNamespace(vocab_size=5),
        SimpleNamespace(vocab_size=Unreadable()),
        Fixed(),
        CardUnreachable(),
        SimpleNamespace(vocab_size="many"),
    ):
        assert _same_vocab(teacher, student) is None


class CardUnreachable:
    """A served teacher whose card cannot be read: its size property raises, as
    `RemoteModel.vocab_size` does when the server does not answer."""

    @property
    def vocab_size(self):
        raise LfmError("cannot reach http://127.0.0.1:1/v1/models")


def test_the_hint_regressor_of_token_features_is_a_linear_layer_over_the_last_dimension():
    from lfm.distill.features import HintProjector

    r = HintProjector(torch.Size([2, 3, 4]), torch.Size([2, 3, 5]))  # (B, T, D) hidden states
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    want = x @ r.proj.weight.T + r.proj.bias
    torch.testing.assert_close(r(x), want)


# The logit losses at a temperature other than 1 (the defaults of reverse KL, top-k KD and DIST
# are 1, where `z / T` and `z * T`, `T²` and `T / T` or `τ³` cannot be told apart).


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kl_list(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_reverse_kl_at_temperature_two_is_t_squared_times_kl_of_the_tempered_student():
    from lfm.distill.losses import ReverseKLConfig, reverse_kl_loss

    s, t = [1.0, 2.0, 3.0, -1.0], [3.0, 2.0, 0.5, 1.0]
    got = reverse_kl_loss(torch.tensor([s]), torch.tensor([t]), ReverseKLConfig(temperature=2.0))
    want = 4 * _kl_list(_softmax(s, 2), _softmax(t, 2))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_residual_topk_kd_at_temperature_two_tempers_the_student_exactly_and_the_bucket_as_one():
    from lfm.distill.losses import TopKConfig, topk_kd_loss

    s, t = [0.5, 1.0, -1.0, 2.0, 0.0], [2.0, 0.0, 1.0, -1.0, 0.5]
    pt = _softmax(t)  # the teacher's log-probabilities come at T = 1
    values = torch.tensor([[math.log(pt[0]), math.log(pt[2])]])
    got = topk_kd_loss(
        torch.tensor([s]),
        (values, torch.tensor([[0, 2]])),
        TopKConfig(k=2, temperature=2.0, residual=True),
    )
    qs = _softmax(s, 2)  # the student's top-k and outside mass, exact at T = 2
    q = [qs[0], qs[2], 1 - qs[0] - qs[2]]
    p = _softmax([math.log(pt[0]), math.log(pt[2]), math.log(1 - pt[0] - pt[2])], 2)
    assert got.item() == pytest.approx(4 * _kl_list(p, q), rel=1e-5)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_at_tau_two_softens_both_sides_and_scales_by_tau_squared():
    from lfm.distill.losses import DISTConfig, dist_loss

    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 1.5], [2.0, 0.0, -1.0]]
    t = [[2.0, 1.0, 0.0], [0.0, -0.5, 2.0], [1.0, 1.5, -2.0]]
    ys, yt = [_softmax(r, 2) for r in s], [_softmax(r, 2) for r in t]
    inter = sum(1 - _pearson(a, b) for a, b in zip(ys, yt, strict=True)) / 3
    cols = [([r[j] for r in ys], [r[j] for r in yt]) for j in range(3)]
    intra = sum(1 - _pearson(a, b) for a, b in cols) / 3
    got = dist_loss(torch.tensor(s), torch.tensor(t), DISTConfig(tau=2.0, beta=1.0, gamma=0.5))
    assert got.item() == pytest.approx(4 * (inter + 0.5 * intra), rel=1e-5)
