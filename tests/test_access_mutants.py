"""What mutation testing (`make mutate AREA=access`) found untested in the handles and levels of
`lfm.access`: each test fails with the mutants it was written against.

Pinned here: `levels` of plain weights (a state dict too) is WEIGHTS alone; `narrow` refuses a bare
state dict (one-line message), names the backend's class when it refuses a level, keeps the
handle's name, picks the classifier or language-model handles for any backend by whether it has
`predict` (a remote client, not only the local handles), and narrows a narrowed handle from the
model behind it (the intermediate handle is not kept alive); a narrowed handle's name, repr and
copy, its pickling refusal naming its class, `module_names` of the HIDDEN handles, and TEXT's
`generate` default and pass-through options; `access_of`'s refusal names the type; `module_of`
and `state_dict_of` (default and given `what` in their messages, a path refused with
`AccessError`, a state dict returned as it is); `LocalClassifier`'s default name and an unbatched
example; `top_logprobs` token rows (T = 2 is enough, unequal or too short rows refused with their
one-line messages, NumPy uint16 rows read as ids); `hidden` on token rows (a tensor, or lists
padded on the right) equals `hidden` on the texts; `logits_from_embeds` passes the attention mask
and moves embeddings and mask to the model's device.
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lfm.access import (
    Access,
    ClassHiddenHandle,
    LabelsHandle,
    LocalClassifier,
    LocalModel,
    TextHandle,
    access_of,
    levels,
    module_of,
    narrow,
    state_dict_of,
)
from lfm.core.tiny import TinyMLP
from lfm.errors import AccessError

from conftest import make_lm


@pytest.fixture(scope="module")
def lm():
    model, tok = make_lm("llama")
    return LocalModel(model.eval(), tok, name="tiny-llama")


class _RemoteLM:
    """A scripted SCORES-level language-model client (no `predict`): records `generate` calls."""

    access = Access.SCORES
    name = "remote-lm"

    def __init__(self):
        self.calls: list[tuple[list[str], int, dict]] = []

    def generate(self, prompts, max_new_tokens=32, **kw):
        self.calls.append((list(prompts), max_new_tokens, kw))
        return [p + "!" for p in prompts]

    def score(self, prompts, continuations):
        return torch.zeros(len(prompts))


class _RemoteClassifier:
    """A scripted classifier client (it has `predict`) at the given level."""

    name = "remote-clf"

    def __init__(self, access=Access.SCORES):
        self.access = access

    def predict(self, x):
        return x.sum(-1).long()

    def scores(self, x):
        return torch.stack([x.sum(-1), -x.sum(-1)], -1).log_softmax(-1)


# -- levels, narrow, access_of --------------------------------------------------------------


def test_levels_of_plain_weights_and_of_handles():
    sd = {"w": torch.zeros(2)}
    assert levels(sd) == [Access.WEIGHTS]
    assert levels(nn.Linear(2, 2)) == [Access.WEIGHTS]
    assert levels(_RemoteLM()) == [Access.TEXT, Access.SCORES]
    hidden_clf = _RemoteClassifier(Access.HIDDEN)
    assert levels(hidden_clf) == [Access.TEXT, Access.SCORES, Access.HIDDEN]


def test_a_bare_state_dict_cannot_be_narrowed():
    with pytest.raises(
        AccessError,
        match=r"^a bare dict cannot be narrowed; wrap it in a LocalModel or LocalClassifier first$",
    ):
        narrow({"w": torch.zeros(2)}, "text")


def test_narrow_refusal_names_the_backends_class():
    c = LocalClassifier(TinyMLP())
    with pytest.raises(
        AccessError,
        match=r"^a LocalClassifier narrows only to TEXT, SCORES, HIDDEN, not EMBEDDINGS$",
    ):
        narrow(c, "embeddings")


def test_a_language_model_client_narrows_to_language_model_handles():
    remote = _RemoteLM()
    t = narrow(remote, "text")
    assert type(t) is TextHandle and t.name == "remote-lm"
    assert t.generate(["a", "b"]) == ["a!", "b!"]


def test_a_classifier_client_narrows_to_classifier_handles():
    remote = _RemoteClassifier(Access.SCORES)
    t = narrow(remote, "text")
    assert type(t) is LabelsHandle and t.name == "remote-clf"
    assert torch.equal(t.predict(torch.tensor([[1.0, 2.0]])), torch.tensor([3]))


def test_narrowing_a_narrowed_handle_does_not_keep_the_intermediate_alive(lm):
    mid = narrow(lm, "scores")
    text = narrow(mid, "text")
    gone = weakref.ref(mid)
    del mid
    gc.collect()
    assert gone() is None  # the TEXT handle reaches the model, not the SCORES handle
    assert text.generate(["Paris is"], max_new_tokens=2) == lm.generate(["Paris is"], 2)


def test_access_of_refusal_names_the_type():
    class Gadget:
        pass

    with pytest.raises(
        AccessError, match=r"^Gadget is not a model handle \(it declares no access level\)$"
    ):
        access_of(Gadget())


# -- narrowed handles: name, repr, copy, pickle, module names, generate ----------------------


def test_narrowed_handles_keep_the_name_and_show_it(lm):
    t = narrow(lm, "text")
    assert t.name == "tiny-llama"
    assert repr(t) == "TextHandle('tiny-llama', access=TEXT)"
    h = narrow(lm, "hidden")
    assert repr(h) == "HiddenHandle('tiny-llama', access=HIDDEN)"
    c = copy.copy(h)
    assert c.name == "tiny-llama" and repr(c) == repr(h)
    assert copy.deepcopy(t).name == "tiny-llama"


def test_pickling_a_narrowed_handle_names_its_class(lm):
    with pytest.raises(
        TypeError, match=r"^a ScoresHandle cannot be pickled \(it reaches a model in memory\)$"
    ):
        pickle.dumps(narrow(lm, "scores"))


def test_hidden_handles_list_the_module_names(lm):
    assert narrow(lm, "hidden").module_names() == lm.module_names()
    c = LocalClassifier(TinyMLP())
    h = narrow(c, "hidden")
    assert isinstance(h, ClassHiddenHandle)
    assert h.module_names() == ["fc1", "fc2"] == c.module_names()


def test_text_handle_generate_default_length_and_options_reach_the_backend():
    remote = _RemoteLM()
    t = narrow(remote, "text")
    t.generate(["a"])
    t.generate(["b"], max_new_tokens=3, temperature=0.5, seed=4, top_p=0.9)
    assert remote.calls == [
        (["a"], 32, {}),
        (["b"], 3, {"temperature": 0.5, "seed": 4, "top_p": 0.9}),
    ]


def test_text_handle_samples_as_the_model_does(lm):
    t = narrow(lm, "text")
    kw = {"max_new_tokens": 4, "temperature": 1.0, "seed": 7}
    assert t.generate(["Paris is"], **kw) == lm.generate(["Paris is"], **kw)
    assert t.generate(["Paris is"]) == lm.generate(["Paris is"], max_new_tokens=32)


# -- module_of, state_dict_of --------------------------------------------------------------


def test_module_of_messages_name_the_caller_or_this_method(lm):
    t = narrow(lm, "text")
    with pytest.raises(
        AccessError, match=r"^this method needs WEIGHTS access, but the handle gives only TEXT$"
    ):
        module_of(t)
    with pytest.raises(AccessError, match=r"^edit/rome needs WEIGHTS access"):
        module_of(t, "edit/rome")
    with pytest.raises(AccessError, match=r"^merge needs a model in memory, not str$"):
        module_of("weights-folder", "merge")
    with pytest.raises(AccessError, match=r"^this method needs a model in memory, not str$"):
        module_of("weights-folder")
    assert module_of(lm) is lm.model


def test_state_dict_of_returns_a_state_dict_as_it_is_and_refuses_a_path():
    sd = {"w": torch.zeros(2)}
    assert state_dict_of(sd) is sd
    lin = nn.Linear(2, 2)
    assert state_dict_of(lin).keys() == {"weight", "bias"}
    with pytest.raises(AccessError, match=r"^this method needs a model in memory, not str$"):
        state_dict_of("weights-folder")
    with pytest.raises(AccessError, match=r"^merge needs a model in memory, not str$"):
        state_dict_of("weights-folder", "merge")


# -- LocalClassifier ------------------------------------------------------------------------


def test_local_classifier_name_and_an_unbatched_example():
    torch.manual_seed(0)
    m = TinyMLP()
    c = LocalClassifier(m)
    assert c.name == "classifier" and repr(c) == "LocalClassifier('classifier', access=WEIGHTS)"
    assert LocalClassifier(m, "mlp").name == "mlp"
    assert narrow(LocalClassifier(m, "mlp"), "text").name == "mlp"
    x = torch.randn(4, 8)
    one = c.scores(x[1])  # one example, no batch dimension: log-probabilities over its classes
    assert one.shape == (3,)
    assert torch.allclose(one, m(x[1]).log_softmax(-1))
    assert torch.allclose(one.exp().sum(), torch.tensor(1.0))
    assert c.predict(x[1]).item() == int(m(x[1]).argmax())
    assert torch.equal(c.predict(x), m(x).argmax(-1))


# -- top_logprobs token rows ----------------------------------------------------------------


def _hand_top(lm, rows, k):
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor(rows)).logits
    return logits[:, :-1].float().log_softmax(-1).topk(k, -1)


def test_top_logprobs_of_rows_of_two_tokens_by_hand(lm):
    rows = [[5, 9], [7, 3]]
    v, i = lm.top_logprobs(rows, 3)
    want_v, want_i = _hand_top(lm, rows, 3)
    assert v.shape == i.shape == (2, 1, 3)
    assert torch.allclose(v, want_v, atol=1e-6) and torch.equal(i, want_i)
    v3, i3 = lm.top_logprobs([[5, 9, 11]], 2)
    want_v3, want_i3 = _hand_top(lm, [[5, 9, 11]], 2)
    assert torch.allclose(v3, want_v3, atol=1e-6) and torch.equal(i3, want_i3)


def test_top_logprobs_reads_numpy_uint16_rows_as_ids(lm):
    rows = [np.array([5, 9, 11], dtype=np.uint16), np.array([7, 3, 300], dtype=np.uint16)]
    v, i = lm.top_logprobs(rows, 2)
    want_v, want_i = _hand_top(lm, [[5, 9, 11], [7, 3, 300]], 2)
    assert torch.allclose(v, want_v, atol=1e-6) and torch.equal(i, want_i)


def test_top_logprobs_refuses_unequal_or_short_rows(lm):
    with pytest.raises(ValueError, match=r"^token rows of unequal lengths \[2, 3\]$"):
        lm.top_logprobs([[5, 9], [7, 3, 1]], 2)
    with pytest.raises(ValueError, match=r"^token rows must be \(B, T ≥ 2\), not \(2, 1\)$"):
        lm.top_logprobs([[5], [7]], 2)
    with pytest.raises(ValueError, match=r"^token rows must be \(B, T ≥ 2\), not \(3,\)$"):
        lm.top_logprobs(torch.tensor([5, 9, 11]), 2)


# -- hidden on token rows, logits_from_embeds -----------------------------------------------


def test_hidden_on_token_rows_equals_hidden_on_the_texts(lm):
    name = "model.norm"
    short, long = "Rome", "The capital of Italy is Rome and"
    ids_s = lm.tokenizer(short)["input_ids"]
    ids_l = lm.tokenizer(long)["input_ids"]
    assert len(ids_s) < len(ids_l)
    alone = lm.hidden([short], [name])[name]
    texts = lm.hidden([long, short], [name])[name]
    by_tensor = lm.hidden(torch.tensor([ids_s]), [name])[name]
    by_lists = lm.hidden([ids_l, ids_s], [name])[name]
    assert by_tensor.shape == alone.shape == (1, len(ids_s), alone.shape[-1])
    assert torch.allclose(by_tensor, alone, atol=1e-6)
    assert by_lists.shape == texts.shape == (2, len(ids_l), alone.shape[-1])
    assert torch.allclose(by_lists, texts, atol=1e-6)
    # right padding: the short row's real tokens are where they are alone
    assert torch.allclose(by_lists[1, : len(ids_s)], alone[0], atol=1e-5)
    narrowed = narrow(lm, "hidden").hidden(torch.tensor([ids_s]), [name])[name]
    assert torch.allclose(narrowed, alone, atol=1e-6)


def test_logits_from_embeds_passes_the_attention_mask(lm):
    texts = ["The capital of Italy is Rome and", "Rome"]
    emb, mask = lm.embed(texts)
    assert mask[1].sum() < mask.shape[1]  # the short text is padded
    got = lm.logits_from_embeds(emb, mask)
    enc = lm._batch(texts, side="right")
    with torch.no_grad():
        want = lm.model(input_ids=enc["input_ids"], attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    n = int(mask[1].sum())
    alone = lm.logits_from_embeds(*lm.embed(["Rome"]))
    assert torch.allclose(got[1, :n], alone[0], atol=1e-5)


class _DeviceProbe(nn.Module):
    """A 'model' whose one parameter lives on the meta device; records where its inputs are."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.empty(1, device="meta"))
        self.seen: list[tuple[torch.device, torch.device]] = []

    def forward(self, inputs_embeds, attention_mask):
        self.seen.append((inputs_embeds.device, attention_mask.device))
        return SimpleNamespace(logits=torch.zeros(*inputs_embeds.shape[:2], 5))


def test_logits_from_embeds_moves_embeddings_and_mask_to_the_models_device():
    probe = _DeviceProbe()
    h = LocalModel(probe, SimpleNamespace(pad_token_id=0))
    out = h.logits_from_embeds(torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.long))
    meta = torch.device("meta")
    assert probe.seen == [(meta, meta)]
    assert out.shape == (1, 2, 5) and out.device.type == "cpu"
