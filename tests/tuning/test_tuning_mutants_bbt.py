"""BBT and the proposer's helpers pinned where mutation testing found them loose.

BBT: the projection's scale (p = A z has the embeddings' spread), where the soft prompt goes
and which position is read, CMA-ES's seed (seed + 1 inside NumPy's range, distinct seeds kept
distinct), a box bound on z, why a search stopped (its budget, or CMA-ES itself) and what the
record says, the bar's best loss, a stray `cma_signals.in` that must not steer the search, a
served model asked only for the rows it needs, and the clear errors of the scores and of a
prompt file of another kind. Also: a generation's best candidate is kept wherever it stands and
a tie keeps the earlier z, the defaults (seed 0, no bar), the bar's name and counts (the start is
the first of the budget's evaluations), and σ̂ read from the first eight templated texts.

The proposer: a model that is not a causal LM is refused, the chat template's user turn ends
with the assistant's header, a greedy proposal works through the bare TEXT protocol and asks for
the configured tokens, the parsing of proposals (replacement characters, quoted leads, the cut
at the limit, the `<INS>` placeholder, the shortest instruction, echoes), interleaved
demonstrations, APE's exact meta-prompt, and the proposer's seeds.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lfm.access import Access, narrow
from lfm.core.io import save_tensors
from lfm.core.tiny import bpe_tokenizer
from lfm.core.tiny import tiny_lm as core_tiny_lm
from lfm.errors import AccessError, AssetError, LfmError
from lfm.serve import Backend, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.bbt import (
    PROMPT_FILE,
    BBTConfig,
    BBTResult,
    _keep_best,
    bbt,
    class_scores_bbt,
    cma_seed,
    load_prompt,
    prepend,
    projection,
)
from lfm.tuning.proposer import (
    APE_HEAD,
    APE_TAIL,
    ape_prompt,
    ape_proposals,
    chat,
    interleaved,
    load_proposer,
    parse,
    propose,
)
from lfm.tuning.tasks import TextClassification
from lfm.tuning.tiny import tiny_news_lm, tiny_task

VERB = tiny_task().verbalizer
SMALL = BBTConfig(n_tokens=2, intrinsic_dim=8, popsize=6, budget=25)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# BBT: the projection, the prompt's place, CMA-ES's seed.


def test_the_projection_gives_the_prompt_the_embeddings_spread():
    d, n, dim, emb_std, sigma0 = 100, 50, 40, 0.3, 2.0
    a = projection(d, n, dim, emb_std, sigma0, seed=3)
    assert a.shape == (n * dim, d)
    # A_ij ~ N(0, σ̂ / (√d σ_z)): 200,000 entries estimate the std to well under 1 %
    want = emb_std / (math.sqrt(d) * sigma0)
    assert abs(float(a.std()) / want - 1) < 0.01 and abs(float(a.mean())) < 0.01 * want
    # so that a z drawn at CMA-ES's step size σ_z gives p = A z with the embeddings' std σ̂
    z = torch.randn(d, generator=torch.Generator().manual_seed(0)) * sigma0
    assert abs(float((a @ z).std()) / emb_std - 1) < 0.2
    assert torch.equal(a, projection(d, n, dim, emb_std, sigma0, seed=3))  # fixed by its seed


def test_the_prompt_goes_first_and_the_last_real_token_is_read():
    prompt = torch.full((2, 3), 7.0)
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # right-padded: 4 and 2 real tokens
    full, full_mask, last = prepend(prompt, embeds, mask)
    assert torch.equal(full[:, :2], torch.full((2, 2, 3), 7.0))
    assert torch.equal(full[:, 2:], embeds)
    assert torch.equal(full_mask, torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]))
    assert last.tolist() == [5, 3]  # the prompt's 2 positions, then each text's last token


def test_cma_es_is_seeded_with_seed_plus_one_inside_numpys_range():
    assert [cma_seed(s) for s in (0, 1, 5, 100, 2**31, 2**32 - 2)] == [
        1, 2, 6, 101, 2**31 + 1, 2**32 - 1,
    ]  # fmt: skip
    # seeds whose seed + 1 falls outside 1 … 2³² − 1 wrap into it, and distinct ones stay distinct
    for seeds in (range(-300, -1), range(2**32 - 1, 2**32 + 300)):
        got = [cma_seed(s) for s in seeds]
        assert all(1 <= g <= 2**32 - 1 for g in got) and len(set(got)) == len(got)


# ---------------------------------------------------------------------------------------------
# BBT: the search.


def test_a_search_ends_on_its_budget_and_records_it():
    res = bbt(narrow(tiny_news_lm(0), "embeddings"), tiny_task(), SMALL, seed=4)
    assert res.evaluations == SMALL.budget and res.stopped == "budget"
    record = res.record()
    assert record["stopped"] == "budget" and record["seed"] == 4
    assert record["evaluations"] == SMALL.budget


class Flat:
    """An EMBEDDINGS handle whose logits never depend on its input: every z has the same loss."""

    access = Access.EMBEDDINGS

    def encode(self, text):
        return [{" sport": 0, " profit": 1, " minister": 2}[text]]

    def embed(self, texts):
        embeds = torch.randn(len(texts), 5, 4, generator=torch.Generator().manual_seed(0))
        return embeds, torch.ones(len(texts), 5, dtype=torch.long)

    def logits_from_embeds(self, embeds, mask):
        return torch.zeros(*embeds.shape[:2], 3)


def test_a_search_that_cma_es_ends_early_says_so():
    cfg = BBTConfig(n_tokens=2, intrinsic_dim=4, popsize=4, budget=400)
    res = bbt(Flat(), tiny_task(), cfg, seed=0)
    # a flat objective ends CMA-ES (`tolflatfitness`) long before the budget
    assert res.stopped == "cma" and res.evaluations < 100
    assert res.record()["stopped"] == "cma"
    assert res.best_loss == res.start_loss == pytest.approx(math.log(3))


def test_a_bound_keeps_z_inside_its_box():
    cfg = SMALL.replace(intrinsic_dim=16, budget=31, bound=0.5)
    res = bbt(narrow(tiny_news_lm(0), "embeddings"), tiny_task(), cfg, seed=0)
    assert res.best_loss < res.start_loss  # a z other than the start was kept
    assert np.abs(res.z).max() <= 0.5 and (res.z < 0).any() and (res.z > 0).any()
    unbounded = bbt(narrow(tiny_news_lm(0), "embeddings"), tiny_task(), cfg.replace(bound=0.0))
    assert np.abs(unbounded.z).max() > 0.5  # the same search without the box leaves it


def test_the_progress_bar_shows_the_best_loss(capfd):
    res = bbt(narrow(tiny_news_lm(0), "embeddings"), tiny_task(), SMALL, seed=0, progress=True)
    out, err = capfd.readouterr()
    assert f"best_loss={res.best_loss:.4f}" in err and out == ""  # CMA-ES itself prints nothing


def test_a_cma_signals_file_in_the_working_directory_does_not_steer_the_search(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    handle = narrow(tiny_news_lm(0), "embeddings")
    plain = bbt(handle, tiny_task(), SMALL, seed=2)
    # `cma` reads versatile options from ./cma_signals.in unless told to be silent enough
    (tmp_path / "cma_signals.in").write_text("{'maxiter': 1, 'maxfevals': 3}")
    steered = bbt(handle, tiny_task(), SMALL, seed=2)
    assert steered.evaluations == plain.evaluations == SMALL.budget
    assert steered.stopped == "budget" and steered.history == plain.history


def test_a_served_model_is_asked_only_for_the_rows_bbt_reads():
    lm = tiny_news_lm(0)
    texts = list(tiny_task().texts)
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    # a server whose answers may hold a few (V,) rows but not every position's logits
    settings = ServeSettings(max_request_bytes=150_000)
    with running(build_app(Backend(lm, "embeddings"), settings)) as url:
        remote = RemoteModel(url, access="embeddings", retries=0)
        embeds, mask = remote.embed([VERB.prompt(t) for t in texts])
        with pytest.raises(LfmError):
            remote.logits_from_embeds(embeds, mask)  # the whole (B, T, V) is refused
        scores = class_scores_bbt(remote, prompt, texts, VERB)
    want = class_scores_bbt(narrow(lm, "embeddings"), prompt, texts, VERB)
    torch.testing.assert_close(scores, want, atol=1e-4, rtol=1e-4)


def test_scores_need_embeddings_access_and_say_so():
    with pytest.raises(AccessError, match="tuning/bbt needs EMBEDDINGS access"):
        class_scores_bbt(narrow(tiny_news_lm(0), "scores"), torch.zeros(2, 32), ["a"], VERB)


def test_a_prompt_file_of_another_kind_is_refused(tmp_path):
    save_tensors(tmp_path / PROMPT_FILE, {"prompt": torch.zeros(2, 3), "z": torch.zeros(4)},
                 "lfm.other/1")  # fmt: skip
    with pytest.raises(LfmError, match=r"is not a lfm\.tuning\.bbt/1 file"):
        load_prompt(tmp_path)


# ---------------------------------------------------------------------------------------------
# The proposer: loading, chat, generation.


def test_a_proposer_that_is_not_a_causal_lm_is_refused(tmp_path):
    model, tok = core_tiny_lm("bert", 0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(AssetError, match="is a encoder model, not a causal-lm"):
        load_proposer(str(tmp_path))


class Chatty:
    """A TEXT handle with a chat-template tokenizer and only the protocol's `generate`."""

    access = Access.TEXT

    def __init__(self, template: str | None = CHATML):
        self.tokenizer = bpe_tokenizer(["some words to train on"])
        self.tokenizer.chat_template = template
        self.calls: list[tuple[list[str], int]] = []

    def generate(self, prompts, max_new_tokens: int = 32):
        self.calls.append((list(prompts), max_new_tokens))
        return [f"[Out {i}.]" for i in range(len(prompts))]


class Sampler(Chatty):
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0):
        self.kw = {"temperature": temperature, "seed": seed}
        return super().generate(prompts, max_new_tokens)


def test_the_meta_prompt_is_a_user_turn_that_asks_for_the_answer():
    assert chat(Chatty(), "Say hi.") == (
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat(Chatty(None), "Say hi.") == "Say hi."  # no template: the text itself

    class OtherTokenizer:  # a tokenizer of another library, without `chat_template`
        access = Access.TEXT
        tokenizer = object()

    assert chat(OtherTokenizer(), "Say hi.") == "Say hi."


def test_a_greedy_proposal_uses_the_bare_text_protocol_and_the_chat_template():
    handle = Chatty()
    out = propose(handle, "Say hi.", n=3, tokens=7, temperature=0.0, seed=5)
    assert out == ["[Out 0.]", "[Out 1.]", "[Out 2.]"]
    assert handle.calls == [([chat(handle, "Say hi.")] * 3, 7)]
    sampler = Sampler()
    propose(sampler, "Say hi.", n=2, tokens=4, temperature=0.7, seed=5)
    assert sampler.kw == {"temperature": 0.7, "seed": 5} and sampler.calls[0][1] == 4


# ---------------------------------------------------------------------------------------------
# The proposer: parsing.


def test_parsing_cleans_replacement_characters_and_quoted_leads():
    assert parse("Give\ufffdthe label.", 300) == "Give the label."
    assert parse("\"Instruction: 'Pick one label.'\"", 300) == "Pick one label."


def test_a_long_proposal_is_cut_at_the_last_word_that_fits():
    text = "Read the text and answer"
    assert parse(text, 17) == "Read the text and"  # a word ending right at the limit stays
    assert parse(text, 16) == "Read the text"
    assert parse("Say the topic", 13) == "Say the topic"  # exactly at the limit: not cut
    assert parse("Supercalifragilistic word", 10) == "Supercalif"  # one long word: cut in it
    # a cut text loses its dangling quote as the uncut text of the same words does
    assert parse('Name the "topic" of the text', 16) == parse('Name the "topic"', 300)
    assert parse('Name the "topic" of the text', 16) == 'Name the "topic'


def test_placeholders_echoes_and_three_letter_instructions():
    assert parse("Sum", 300) == "Sum"  # three characters are enough
    assert parse("Use <INS> for the answer", 300) is None
    assert parse("Read the input and give an output", 300) is None  # the meta-prompt's words
    # but words of them followed by one of the proposal's own are an instruction
    assert parse("Read the input and give an output X", 300) == (
        "Read the input and give an output X"
    )


# ---------------------------------------------------------------------------------------------
# The proposer: APE's demonstrations and meta-prompt.


def test_demonstrations_take_each_class_in_turn():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    idx = interleaved(labels, 7, random.Random(0))
    assert [int(labels[i]) for i in idx] == [0, 1, 2, 0, 1, 2, 0]
    assert sorted(set(idx)) == sorted(idx)  # no example twice
    uneven = torch.tensor([0, 0, 0, 1])
    idx = interleaved(uneven, 4, random.Random(1))
    assert [int(uneven[i]) for i in idx] == [0, 1, 0, 0] and sorted(idx) == [0, 1, 2, 3]
    assert interleaved(torch.tensor([], dtype=torch.long), 3, random.Random(0)) == []


def test_apes_meta_prompt_shows_the_pairs_and_asks_for_the_instruction():
    want = (
        "I gave a friend an instruction and 2 inputs. The friend read the instruction and wrote "
        "an output for every one of the inputs. Here are the input-output pairs:\n\n"
        "Input: a cup final\nOutput: sport\n\nInput: profit fell\nOutput: business\n\n"
        "The instruction was (write it in square brackets):"
    )
    assert ape_prompt([("a cup final", "sport"), ("profit fell", "business")]) == want
    assert want.startswith(APE_HEAD.format(n=2)) and want.endswith(APE_TAIL)


def _ape(handle, seed: int, demos: int = 2):
    task = tiny_task()
    return ape_proposals(handle, task.texts, task.labels, ("sport", "business", "politics"),
                         n=2, demos=demos, chars=100, tokens=8, temperature=0.7,
                         max_chars=200, seed=seed)  # fmt: skip


def test_ape_shows_the_asked_demonstrations_and_samples_under_distinct_seeds():
    handle = Sampler()
    proposals, meta = _ape(handle, seed=0)
    assert proposals == ["Out 0.", "Out 1."]
    assert meta.count("Input: ") == 2 and "and 2 inputs" in meta
    seeds = set()
    for seed in range(20):
        _ape(handle, seed)
        seeds.add(handle.kw["seed"])
    # one seed per run, distinct across runs, and a non-negative 31-bit integer: a seed every
    # backend's type holds (llama.cpp's is uint32, others' int32 or int64)
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)


# ---------------------------------------------------------------------------------------------
# BBT: the best candidate kept, the defaults, the bar's counts, the sample σ̂ is read from.


def _result(best_loss: float) -> BBTResult:
    z0 = np.zeros(4)
    return BBTResult(method="bbt", config=SMALL, prompt=torch.zeros(2, 2), z=z0, verbalizer=VERB,
                     seed=0, emb_std=1.0, start_loss=best_loss, best_loss=best_loss)  # fmt: skip


def test_the_best_candidate_of_a_generation_is_kept_and_a_tie_keeps_the_earlier_one():
    a = torch.eye(4)  # p = z, viewed as (2, 2)
    xs = [np.array([1.0, 0, 0, 0]), np.array([0, 2.0, 0, 0]), np.array([0, 0, 3.0, 0])]
    res = _result(1.0)
    _keep_best(res, xs, [0.9, 0.5, 0.7], a, 2)  # the best is the second candidate
    assert res.best_loss == 0.5 and np.array_equal(res.z, xs[1])
    assert torch.equal(res.prompt, torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
    later = [np.array([0, 0, 0, 4.0]), np.array([5.0, 0, 0, 0])]
    _keep_best(res, later, [0.6, 0.5], a, 2)  # no better: a tie does not replace the kept z
    assert res.best_loss == 0.5 and np.array_equal(res.z, xs[1])
    assert res.history == [0.5, 0.5]  # the best loss after each generation


def test_on_a_flat_objective_the_starting_prompt_stays_the_best():
    cfg = BBTConfig(n_tokens=2, intrinsic_dim=4, popsize=4, budget=12)
    res = bbt(Flat(), tiny_task(), cfg, seed=0)
    # every candidate of the generation CMA-ES ran ties with z = 0: none is better, so the
    # start is kept
    assert res.evaluations > 1 and not res.z.any() and not res.prompt.any()


def test_bbt_defaults_to_seed_0_and_no_bar(capfd):
    handle = narrow(tiny_news_lm(0), "embeddings")
    plain = bbt(handle, tiny_task(), SMALL)
    out, err = capfd.readouterr()
    assert out == err == ""  # no bar unless asked
    seed0 = bbt(handle, tiny_task(), SMALL, seed=0)
    seed1 = bbt(handle, tiny_task(), SMALL, seed=1)
    assert plain.seed == 0 and plain.history == seed0.history and np.array_equal(plain.z, seed0.z)
    assert not np.array_equal(plain.z, seed1.z)


def test_the_bar_is_named_bbt_and_counts_every_evaluation_of_the_budget(capfd):
    bbt(narrow(tiny_news_lm(0), "embeddings"), tiny_task(), SMALL, seed=0, progress=True)
    _, err = capfd.readouterr()
    states = [s for s in err.split("\r") if s.strip()]
    assert all(s.startswith("bbt: ") for s in states)
    # the start (z = 0) is the first evaluation, then one per candidate, up to the budget
    assert "| 1/25 [" in states[0] and "| 25/25 [" in states[-1] and "100%" in states[-1]


class Spy:
    """An EMBEDDINGS handle that records the texts of each `embed` call."""

    access = Access.EMBEDDINGS

    def __init__(self) -> None:
        self.inner = narrow(tiny_news_lm(0), "embeddings")
        self.calls: list[list[str]] = []

    def encode(self, text):
        return self.inner.encode(text)

    def embed(self, texts):
        self.calls.append(list(texts))
        return self.inner.embed(texts)

    def logits_from_embeds(self, embeds, mask):
        return self.inner.logits_from_embeds(embeds, mask)


def test_the_embeddings_spread_is_read_from_the_first_eight_texts():
    base = tiny_task()
    texts = [*base.texts, "Parliament passed the new budget law after a very long debate.",
             "The minister resigned.", "A late goal won it.", "Profits fell sharply.",
             "Voters went to the polls in the spring election."]  # fmt: skip
    labels = [*base.labels.tolist(), 2, 2, 0, 1, 2]
    task = TextClassification(texts, torch.tensor(labels), base.verbalizer)
    spy = Spy()
    res = bbt(spy, task, SMALL.replace(budget=7), seed=0)
    want = [VERB.prompt(t) for t in texts[:8]]
    assert spy.calls[0] == want  # one small call for σ̂, then the whole train set
    embeds, mask = spy.inner.embed(want)
    assert res.emb_std == float(embeds[mask.bool()].std())
    assert res.emb_std != float(spy.inner.embed([VERB.prompt(t) for t in texts[:9]])[0].std())
