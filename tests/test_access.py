"""Access levels, the white-box handle and narrowed handles."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from lfm.access import (
    _BACKENDS,
    Access,
    ClassScoresHandle,
    HiddenHandle,
    LabelsHandle,
    LocalClassifier,
    LocalModel,
    ScoresHandle,
    TextHandle,
    narrow,
    require,
)
from lfm.errors import AccessError


def test_levels_are_ordered_and_parse():
    assert Access.TEXT < Access.SCORES < Access.EMBEDDINGS < Access.HIDDEN < Access.WEIGHTS
    assert Access.parse("Scores") is Access.SCORES
    assert Access.parse(5) is Access.WEIGHTS
    with pytest.raises(AccessError, match="unknown access level 'logits'"):
        Access.parse("logits")


def test_score_matches_a_hand_computation(tiny_lm):
    model, tok = tiny_lm
    h = LocalModel(model, tok)
    prompt, cont = "Paris is the capital of", " France"
    ids = tok(prompt + cont)["input_ids"]
    n_ctx = len(tok(prompt)["input_ids"])
    logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
    got = h.score(
        [prompt, "x"], [cont, " y"]
    )  # batched with a shorter pair: padding must not matter
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(want, abs=1e-4)


def test_next_token_logprobs_ignore_left_padding(tiny_llama):
    h = LocalModel(*tiny_llama)
    alone = h.next_token_logprobs(["Rome"])
    batched = h.next_token_logprobs(["Rome", "The capital of Italy is Rome and"])
    assert torch.allclose(alone[0], batched[0], atol=1e-4)
    assert torch.allclose(batched.exp().sum(-1), torch.ones(2), atol=1e-4)


def test_embeddings_level_reproduces_scores(tiny_llama):
    model, tok = tiny_llama
    h = LocalModel(model, tok)
    emb, mask = h.embed(["Tokyo is a large city"])
    logits = h.logits_from_embeds(emb, mask)
    ids = tok(["Tokyo is a large city"], return_tensors="pt")["input_ids"]
    assert torch.allclose(logits, model(ids).logits, atol=1e-5)


def test_hidden_returns_named_activations(tiny_lm):
    h = LocalModel(*tiny_lm)
    name = h.module_names()[5]
    acts = h.hidden(["Paris is"], [name])
    assert set(acts) == {name} and acts[name].shape[0] == 1
    with pytest.raises(AccessError, match="no module named nope"):
        h.hidden(["Paris is"], ["nope"])


@pytest.mark.parametrize(
    ("level", "cls", "absent"),
    [
        ("text", TextHandle, ["score", "next_token_logprobs", "embed", "hidden", "model"]),
        ("scores", ScoresHandle, ["embed", "logits_from_embeds", "hidden", "model", "tokenizer"]),
        ("hidden", HiddenHandle, ["model", "tokenizer", "parameters"]),
    ],
)
def test_narrowed_handle_exposes_only_its_level(tiny_llama, level, cls, absent):
    h = LocalModel(*tiny_llama)
    n = narrow(h, level)
    assert type(n) is cls and n.access == Access.parse(level)
    for attr in absent:
        assert not hasattr(n, attr), attr


def _reachable_state(obj, depth=6):
    """Everything reachable through instance state (slots, __dict__, containers), not code."""
    seen, todo, found = set(), [(obj, 0)], []
    while todo:
        o, d = todo.pop()
        if id(o) in seen or d > depth or isinstance(o, type):
            continue
        seen.add(id(o))
        found.append(o)
        children = []
        for slot in getattr(type(o), "__slots__", ()):
            for klass in type(o).__mro__:
                if slot in getattr(klass, "__slots__", ()) and hasattr(o, slot):
                    children.append(getattr(o, slot))
        children += list(getattr(o, "__dict__", {}).values())
        if isinstance(o, dict):
            children += list(o.values())
        if isinstance(o, list | tuple | set):
            children += list(o)
        todo += [(c, d + 1) for c in children]
    return found


def test_narrowed_handle_holds_no_reference_to_weights(tiny_llama):
    h = LocalModel(*tiny_llama)
    for level in ("text", "scores", "embeddings", "hidden"):
        state = _reachable_state(narrow(h, level))
        assert not any(isinstance(o, nn.Module | torch.Tensor | LocalModel) for o in state), level
    # while the white-box handle, by contrast, does reach them
    assert any(isinstance(o, nn.Module) for o in _reachable_state(h))


def test_narrowed_handle_gives_the_same_answers(tiny_llama):
    h = LocalModel(*tiny_llama)
    n = narrow(h, "scores")
    assert torch.equal(n.score(["Paris is"], [" the"]), h.score(["Paris is"], [" the"]))
    assert n.generate(["Paris is"], max_new_tokens=3) == h.generate(["Paris is"], max_new_tokens=3)
    assert narrow(n, "text").generate(["Paris"], max_new_tokens=2) == h.generate(
        ["Paris"], max_new_tokens=2
    )


def test_narrowing_cannot_widen_and_require_names_both_levels(tiny_llama):
    n = narrow(LocalModel(*tiny_llama), "scores")
    with pytest.raises(AccessError, match="cannot widen a SCORES handle to HIDDEN"):
        narrow(n, "hidden")
    with pytest.raises(
        AccessError, match="edit/rome needs WEIGHTS access, but the handle gives only SCORES"
    ):
        require(n, Access.WEIGHTS, "edit/rome")
    require(n, Access.SCORES, "ok")  # enough access: no error
    with pytest.raises(AccessError, match="not a model handle"):
        require(object(), Access.TEXT, "x")


def test_backend_table_forgets_dead_handles(tiny_llama):
    h = LocalModel(*tiny_llama)
    gc.collect()  # handles that earlier tests dropped leave the table first
    before = len(_BACKENDS)
    n = narrow(h, "text")
    assert len(_BACKENDS) == before + 1
    del n
    gc.collect()
    assert len(_BACKENDS) == before


def test_classifier_narrows_to_scores_and_labels(tiny_mlp):
    c = LocalClassifier(tiny_mlp)
    x = torch.randn(4, 8)
    s = narrow(c, "scores")
    assert isinstance(s, ClassScoresHandle)
    assert torch.allclose(s.scores(x), tiny_mlp(x).log_softmax(-1))
    t = narrow(c, Access.TEXT)
    assert isinstance(t, LabelsHandle) and not hasattr(t, "scores")
    assert torch.equal(t.predict(x), tiny_mlp(x).argmax(-1))
    with pytest.raises(AccessError, match="narrows only to TEXT, SCORES, HIDDEN, not EMBEDDINGS"):
        narrow(c, "embeddings")


def test_a_copied_handle_outlives_the_original(tiny_llama):
    import copy

    h = LocalModel(*tiny_llama)
    n = narrow(h, "scores")
    shallow, deep = copy.copy(n), copy.deepcopy(n)
    want = n.score(["Paris is"], [" the"])
    del n
    gc.collect()
    assert torch.equal(shallow.score(["Paris is"], [" the"]), want)
    assert torch.equal(deep.score(["Paris is"], [" the"]), want)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(shallow)


def test_handles_leave_the_callers_tokenizer_and_rng_alone(tiny_llama):
    model, tok = tiny_llama
    tok.padding_side = "right"
    h = LocalModel(model, tok)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    h.generate(["Paris is", "The capital of Italy is"], max_new_tokens=3, temperature=1.0, seed=7)
    h.next_token_logprobs(["Rome", "The capital of Italy is Rome and"])
    assert tok.padding_side == "right"
    assert torch.equal(torch.get_rng_state(), state)
    # sampling is reproducible under its own seed, whatever the global state
    a = h.generate(["Paris is"], max_new_tokens=4, temperature=1.0, seed=7)
    torch.manual_seed(999)
    assert h.generate(["Paris is"], max_new_tokens=4, temperature=1.0, seed=7) == a


def test_a_tokenizer_without_pad_token_is_not_changed(tiny_llama):
    model, tok = tiny_llama
    tok.pad_token = None
    h = LocalModel(model, tok)
    assert tok.pad_token is None and h.tokenizer.pad_token == h.tokenizer.eos_token
    assert h.score(["Paris is", "x"], [" the", " y"]).shape == (2,)


def test_left_padding_done_by_the_handle_matches_the_tokenizers(tiny_llama):
    model, tok = tiny_llama
    h = LocalModel(model, tok)
    got = h._batch(["Rome", "The capital of Italy"], side="left")
    want = tok(
        ["Rome", "The capital of Italy"], return_tensors="pt", padding=True, padding_side="left"
    )
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_classifier_narrows_to_hidden_with_features(tiny_cnn):
    from lfm.access import ClassHiddenHandle, levels, module_of, state_dict_of

    c = LocalClassifier(tiny_cnn.eval())
    h = narrow(c, "hidden")
    x = torch.rand(2, 1, 8, 8)
    assert isinstance(h, ClassHiddenHandle) and not hasattr(h, "model")
    feats = h.hidden(x, ["conv2"])
    assert feats["conv2"].shape == (2, 8, 8, 8)
    assert torch.allclose(h.scores(x), tiny_cnn(x).log_softmax(-1))
    assert levels(h) == [Access.TEXT, Access.SCORES, Access.HIDDEN]
    with pytest.raises(AccessError, match="narrows only to TEXT, SCORES, HIDDEN, not EMBEDDINGS"):
        narrow(c, "embeddings")
    assert module_of(c) is tiny_cnn and state_dict_of(c).keys() == tiny_cnn.state_dict().keys()
    with pytest.raises(AccessError, match="needs WEIGHTS access, but the handle gives only HIDDEN"):
        module_of(h)


def test_plain_weights_are_white_box():
    from lfm.access import access_of

    assert access_of(nn.Linear(2, 2)) is Access.WEIGHTS
    assert access_of({"w": torch.zeros(2)}) is Access.WEIGHTS
    assert access_of("model-folder") is Access.WEIGHTS
    with pytest.raises(AccessError, match="bare Linear cannot be narrowed"):
        narrow(nn.Linear(2, 2), "scores")


def test_seeded_draws_are_the_seeds_and_the_callers_state_comes_back():
    from lfm.core.seeding import seeded

    before = torch.get_rng_state()
    with seeded(5):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    assert torch.equal(inside, torch.rand(3))  # the draws of `manual_seed(5)`
    torch.set_rng_state(before)
