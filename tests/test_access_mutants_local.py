"""The local model's text, scores and padding, as found by mutation testing.

Pins what `LocalModel` must do that simpler versions of it did not: its defaults (name, batch
size; greedy 32-token generation, seed 0, top_p 1), greedy text equal to the argmax continuation
by hand and sampled text that differs from it, batched generation equal to each prompt alone (left
padding, the handle's pad token, special tokens dropped, every chunk kept), scores equal to
hand-computed sums where the joint tokenisation splits a word or absorbs the continuation, the
padding mask it hands the model, its refusals and empty answers, right padding with the pad token
(id 0 included), `top_logprobs` by hand, `decode` without special tokens, a tokenizer without any
pad attribute, and that every tensor it builds is on the model's device (meta here).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lfm.access import LocalModel, narrow

from conftest import OnMeta, make_lm


def _greedy(model, ids, n):
    """The argmax continuation of `ids`, n tokens, by hand (one forward pass per token)."""
    ids, out = list(ids), list[int]()
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


class _EmbedLM(nn.Module):
    """The least causal LM: an embedding, scaled by the attention mask, and a linear head."""

    def __init__(self, vocab: int, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        return SimpleNamespace(logits=self.head(x))


# -- construction --------------------------------------------------------------------------


def test_a_handle_is_named_model_and_takes_16_texts_a_pass_by_default():
    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    assert h.name == "model" and repr(h) == "LocalModel('model', access=WEIGHTS)"
    assert narrow(h, "text").name == "model"
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    assert h.next_token_logprobs(["Rome"] * 17).shape[0] == 17
    assert sizes == [16, 1]


def test_the_given_name_reaches_repr_and_narrowed_handles():
    h = LocalModel(*make_lm("llama"), name="tiny/llama")
    assert h.name == "tiny/llama" and repr(h) == "LocalModel('tiny/llama', access=WEIGHTS)"
    assert narrow(h, "scores").name == "tiny/llama"
    assert repr(narrow(h, "text")) == "TextHandle('tiny/llama', access=TEXT)"


def test_a_tokenizer_without_any_pad_attribute_gets_eos_on_a_copy():
    class Bare:  # a duck-typed tokenizer that has no pad_token_id attribute at all
        eos_token = "<eos>"

    bare = Bare()
    h = LocalModel(make_lm("llama")[0], bare)
    assert h.tokenizer.pad_token == "<eos>" and h.tokenizer is not bare
    assert not hasattr(bare, "pad_token")


def test_decode_drops_special_tokens():
    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    ids = [tok.bos_token_id, *h.encode("Paris is"), tok.eos_token_id, tok.pad_token_id]
    assert h.decode(ids) == "Paris is"


# -- padding -------------------------------------------------------------------------------


def test_right_padding_uses_the_pad_token_even_when_its_id_is_0():
    model, tok = make_lm("llama")
    tok.pad_token = "<bos>"  # id 0: `pad_token_id or 0` must still give it
    h = LocalModel(model, tok)
    assert h.tokenizer.pad_token_id == 0
    short, long = tok(["Rome", "The capital of Italy"])["input_ids"]
    emb, mask = h.embed(["Rome", "The capital of Italy"])
    table = model.get_input_embeddings().weight.detach()
    n = len(short)
    assert mask.tolist() == [[1] * n + [0] * (len(long) - n), [1] * len(long)]
    torch.testing.assert_close(emb[0, :n], table[short])  # the real tokens first
    torch.testing.assert_close(emb[0, n:], table[[0] * (len(long) - n)])  # then pad id 0
    torch.testing.assert_close(emb[1], table[long])


def test_an_empty_batch_of_token_rows_gives_empty_activations():
    _, tok = make_lm("llama")
    h = LocalModel(_EmbedLM(len(tok)).eval(), tok)
    acts = h.hidden(torch.zeros((0, 3), dtype=torch.long), ["emb"])
    assert acts["emb"].shape == (0, 0, 8)  # no rows: the longest row, and the width, is 0


def test_every_tensor_the_handle_builds_is_on_the_models_device():
    _, tok = make_lm("llama")
    h = LocalModel(_EmbedLM(len(tok)).to("meta"), tok)
    assert h.device.type == "meta"
    with OnMeta():
        acts = h.hidden(["Rome", "The capital of Italy"], ["emb"])
        scores = h.score(["Paris is", "x"], [" the", " y z"])
        values, ids = h.top_logprobs([[0, 297, 262], [0, 307, 71]], 3)
        nxt = h.next_token_logprobs(["Rome", "The capital"])
    assert acts["emb"].shape[:2] == (2, len(tok("The capital of Italy")["input_ids"]))
    assert scores.shape == (2,) and values.shape == ids.shape == (2, 2, 3)
    assert nxt.shape == (2, len(tok))


# -- scores --------------------------------------------------------------------------------


def _by_hand(model, ctx, tgt):
    ids = ctx + tgt
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))


def test_score_passes_the_model_a_mask_of_the_right_padding():
    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    masks: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True
    )
    h.score(["Paris is", "x"], [" the", " y"])
    n0 = len(tok("Paris is the")["input_ids"])
    n1 = len(tok("x y")["input_ids"])
    assert len(masks) == 1 and masks[0] is not None
    assert masks[0].tolist() == [[1] * n0, [1] * n1 + [0] * (n0 - n1)]


@pytest.mark.parametrize(
    ("prompt", "cont"),
    [("Paris is the capit", "al of France"), ("The capital of Ita", "ly is Rome")],
)
def test_a_continuation_that_splits_a_word_is_scored_as_its_own_tokens(prompt, cont):
    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    ctx, whole = tok(prompt)["input_ids"], tok(prompt + cont)["input_ids"]
    assert whole[: len(ctx)] != ctx and len(whole) > len(ctx)  # the joint text merges across
    assert whole[len(ctx) :] != h.encode(cont)  # so its tail is not the continuation's tokens
    want = _by_hand(model, ctx, h.encode(cont))
    assert h.score([prompt], [cont])[0].item() == pytest.approx(want, abs=1e-4)


def test_a_continuation_the_joint_text_absorbs_is_still_scored():
    from tokenizers import Regex, normalizers

    model, tok = make_lm("llama")
    tok.backend_tokenizer.normalizer = normalizers.Replace(Regex(" {2,}"), " ")  # as T5 does
    h = LocalModel(model, tok)
    ctx = tok("Paris ")["input_ids"]
    assert tok("Paris  ")["input_ids"] == ctx and h.encode(" ")  # joined, the space vanishes
    want = _by_hand(model, ctx, h.encode(" "))
    assert want < 0
    assert h.score(["Paris "], [" "])[0].item() == pytest.approx(want, abs=1e-4)


def test_score_refuses_unequal_lengths_and_scores_nothing_as_empty():
    h = LocalModel(*make_lm("llama"))
    with pytest.raises(ValueError, match=r"^2 prompts but 1 continuations$"):
        h.score(["a", "b"], [" c"])
    out = h.score([], [])
    assert out.shape == (0,)


def test_top_logprobs_by_hand_with_k_above_the_row_length():
    model, _ = make_lm("llama")
    h = LocalModel(model, make_lm("llama")[1])
    rows = [[0, 297, 262], [0, 307, 71]]  # T = 3 < k = 5 < V
    values, ids = h.top_logprobs(rows, 5)
    with torch.no_grad():
        logp = model(torch.tensor(rows)).logits[:, :-1].log_softmax(-1)
    want_v, want_i = logp.topk(5, dim=-1)
    assert values.shape == ids.shape == (2, 2, 5)
    torch.testing.assert_close(values, want_v)
    assert torch.equal(ids, want_i)


# -- generation ----------------------------------------------------------------------------


def test_default_generation_is_32_greedy_tokens_and_sampling_defaults_to_seed_0_top_p_1():
    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    greedy = tok.decode(_greedy(model, tok("Paris is")["input_ids"], 32))
    assert h.generate(["Paris is"]) == [greedy]
    kw = {"max_new_tokens": 6, "temperature": 1.0}
    sampled = h.generate(["Paris is"], **kw)
    assert sampled == h.generate(["Paris is"], seed=0, top_p=1.0, **kw)
    assert sampled != h.generate(["Paris is"], seed=1, **kw)  # the seed matters, so 0 is pinned


def test_greedy_text_is_the_argmax_continuation_and_sampling_departs_from_it():
    model, tok = make_lm("llama")
    h = LocalModel(model, tok)
    greedy = [tok.decode(_greedy(model, tok("Paris is")["input_ids"], 6))]
    assert h.generate(["Paris is"], max_new_tokens=6) == greedy
    assert h.generate(["Paris is"], max_new_tokens=6, temperature=0.0, seed=3) == greedy
    for temperature in (1.0, 0.5):  # both sample (top_k off): neither is the argmax text
        assert h.generate(["Paris is"], max_new_tokens=6, temperature=temperature) != greedy


def test_batched_generation_matches_each_prompt_alone_when_one_stops_early():
    model, tok = make_lm("llama")
    a, b = "Paris is", "The capital of Italy"
    stop = _greedy(model, tok(a)["input_ids"], 1)[0]  # `a` ends after its first token
    b_ids = tok(b)["input_ids"]
    assert len(b_ids) != len(tok(a)["input_ids"]) and stop not in _greedy(model, b_ids, 4)
    filler = 5  # a plain token as the model's own pad: the handle must pad with its tokenizer's
    assert filler not in (stop, tok.pad_token_id)
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = filler
    h = LocalModel(model, tok)
    alone = [h.generate([a], max_new_tokens=4)[0], h.generate([b], max_new_tokens=4)[0]]
    assert alone == [tok.decode([stop]), tok.decode(_greedy(model, b_ids, 4))]
    assert h.generate([a, b], max_new_tokens=4) == alone


def test_generate_returns_the_texts_of_every_chunk():
    model, tok = make_lm("llama")
    h = LocalModel(model, tok, batch_size=1)
    prompts = ["Paris is", "The capital of Italy"]
    want = [tok.decode(_greedy(model, tok(p)["input_ids"], 2)) for p in prompts]
    assert h.generate(prompts, max_new_tokens=2) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("on_gpu", [True, False])
def test_sampling_on_a_gpu_leaves_its_random_state_alone(on_gpu):
    """Also with the model on the CPU: `manual_seed` reseeds every CUDA device."""
    model, tok = make_lm("llama")
    h = LocalModel(model.cuda() if on_gpu else model, tok)
    torch.cuda.manual_seed_all(123)
    states = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    h.generate(["Paris is"], max_new_tokens=4, temperature=1.0, seed=7)
    after = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(after, states, strict=True))
