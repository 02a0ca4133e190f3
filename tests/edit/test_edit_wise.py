"""WISE: edits live in a side memory that a router applies to edited prompts only."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from lfm import registry
from lfm.core.io import save_tensors
from lfm.edit import Request, WiseConfig, WiseMemory, common, wise, wise_step
from lfm.edit.patch import fingerprint
from lfm.edit.wise import _call_state, default_layer, route, ties_merge
from lfm.errors import ConfigError, LfmError

from conftest import OnMeta

wise_mod = importlib.import_module("lfm.edit.wise")  # `lfm.edit.wise` is also the function
REQ = common.SMOKE_REQUEST  # "The city of the Eiffel Tower" -> " Rome"
UNRELATED = "The Colosseum is located in the city of"
# The tiny model's projection inputs are ~0.05 long (SmolLM2's ~20): margins, step and entry
# bound on that scale (paper: α, β, γ = 5, 20, 10, lr 1, clamp 1)
CFG = WiseConfig(lr=10, clamp=10, alpha=0.05, beta=0.5, gamma=0.25)
WORDS = ["Tower", "Colosseum", "Paris", "Rome", "France", "Berlin", "Germany", "Tokyo", "Japan", "Kyoto"]  # fmt: skip
TEN = [Request(f"The city of the {w}", w, WORDS[(i + 7) % 10]) for i, w in enumerate(WORDS)]


@pytest.fixture
def h():
    return common.smoke_model("llama", 1)  # " Paris" leads " Rome" on REQ before the edit


def _top(h, prompts: list[str]) -> list[str]:
    ids = h.next_token_logprobs(prompts).argmax(-1)
    return [h.tokenizer.decode(int(i)).strip() for i in ids]


def _weights(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same(h, weights) -> bool:
    return all(torch.equal(weights[k], v) for k, v in h.model.state_dict().items())


def test_edit_wins_main_memory_untouched_and_revert_is_exact(h):
    weights = _weights(h)
    base = h.next_token_logprobs([REQ.prompt, UNRELATED])
    before = float(h.score([REQ.prompt], [" Rome"]))
    assert _top(h, [REQ.prompt]) != ["Rome"]
    memory = registry.run("edit", "wise", h, REQ, cfg=CFG)
    assert isinstance(memory, WiseMemory) and memory.module == "model.layers.1.mlp.down_proj"
    assert _same(h, weights)  # computing the memory changes nothing
    undo = memory.apply(h.model)
    try:
        assert _top(h, [REQ.prompt]) == ["Rome"], "WISE did not make ' Rome' the argmax"
        assert float(h.score([REQ.prompt], [" Rome"])) > before + 0.5  # measured: +0.84 nats
        edited = h.next_token_logprobs([REQ.prompt, UNRELATED])
        assert torch.equal(edited[1], base[1])  # the unrelated row: the main memory's output
        assert _same(h, weights)  # the main memory is never written
    finally:
        undo.revert(h.model)
    assert (
        not h.model._forward_pre_hooks and not h.model.get_submodule(memory.module)._forward_hooks
    )
    assert torch.equal(h.next_token_logprobs([REQ.prompt, UNRELATED]), base)
    assert _same(h, weights)


def test_the_router_sends_only_the_edit_to_the_side_memory(h):
    """Each row of one padded batch is routed on its own: the edited prompt gets exactly the
    side memory's output, the unrelated one exactly the main memory's; with the router removed
    (ε below every score: the side memory always used) the unrelated row changes."""
    prompts = [REQ.prompt, UNRELATED]
    base = h.next_token_logprobs(prompts)
    memory = wise(h, REQ, CFG)
    undo = memory.apply(h.model)
    routed = h.next_token_logprobs(prompts)
    undo.revert(h.model)
    memory.epsilon = -1.0  # no routing: every sequence reads the side memory
    undo = memory.apply(h.model)
    always = h.next_token_logprobs(prompts)
    undo.revert(h.model)
    assert torch.equal(routed[0], always[0]) and not torch.equal(routed[0], base[0])
    assert torch.equal(routed[1], base[1])
    assert not torch.equal(always[1], base[1]), "the side memory leaves the unrelated row as is"


def test_route_ignores_padding_and_keeps_a_generation_routed():
    side = torch.eye(2)  # W_v' − W_v: the score of a token is ‖a‖
    a, out = torch.tensor([[[0.1, 0.0], [5.0, 0.0]]]), torch.zeros(1, 2, 2)
    assert route(side, 1.0, a, out, None)[1].tolist() == [True]
    assert route(side, 1.0, a, out, torch.tensor([[1, 0]]))[1].tolist() == [False]  # 5 is padding
    quiet = torch.tensor([[[0.1, 0.0]]])  # one generated token, below ε
    new, routed = route(side, 1.0, quiet, torch.zeros(1, 1, 2), None, torch.tensor([True]))
    assert routed.tolist() == [True] and torch.equal(new, quiet)  # routed on its prompt: stays
    assert route(side, 1.0, quiet, torch.zeros(1, 1, 2), None)[1].tolist() == [False]

    class Cache:  # what `generate` passes: a cache that knows how many tokens it holds
        def __init__(self, n: int) -> None:
            self.n = n

        def get_seq_length(self) -> int:
            return self.n

    mask = torch.ones(1, 3)
    assert _call_state({"attention_mask": mask, "past_key_values": Cache(2)}) == (mask, True)
    assert _call_state({"past_key_values": Cache(0)}) == (None, False)


def test_generation_reads_the_side_memory_past_the_prompt(h):
    memory = wise(h, REQ, CFG)
    before = h.generate([REQ.prompt, UNRELATED], max_new_tokens=3)
    undo = memory.apply(h.model)
    try:
        after = h.generate([REQ.prompt, UNRELATED], max_new_tokens=3)
    finally:
        undo.revert(h.model)
    assert after[0].split()[0] == "Rome" and before[0].split()[0] != "Rome"
    assert after[1] == before[1]


def test_edits_change_only_the_entries_of_their_shards_mask(h):
    memory = wise(h, TEN[:3], CFG.replace(shard_size=2))
    assert [s.edits for s in memory.shards] == [2, 1]
    for shard in memory.shards:
        assert 0.15 < shard.mask.float().mean() < 0.25  # ρ = 0.2
        assert bool((shard.delta[~shard.mask] == 0).all())
        assert bool((shard.delta[shard.mask] != 0).any())
    union = memory.shards[0].mask | memory.shards[1].mask
    assert bool((memory.side[~union] == 0).all())
    assert not torch.equal(memory.shards[0].mask, memory.shards[1].mask)  # a new mask per shard


def test_without_the_mask_entries_outside_it_change(h, monkeypatch):
    """The mask removed (τ used as it is): the check above would fail."""
    monkeypatch.setattr(wise_mod, "masked", lambda delta, mask: delta)
    shard = wise(h, REQ, CFG).shards[0]
    assert bool((shard.delta[~shard.mask] != 0).any())


def test_ties_merge_by_hand():
    a = torch.tensor([[1.0, -2.0, 0.0, 4.0]])
    b = torch.tensor([[3.0, 1.0, -0.5, 0.0]])
    # full density: signs elected by the sums (+4, −1, −0.5, +4), agreeing entries averaged
    assert torch.equal(ties_merge([a, b], 1.0), torch.tensor([[2.0, -2.0, -0.5, 4.0]]))
    # density 0.5: a keeps {−2, 4}, b keeps {3, 1}; sums (+3, −1, 0, +4)
    assert torch.equal(ties_merge([a, b], 0.5), torch.tensor([[3.0, -2.0, 0.0, 4.0]]))
    assert torch.equal(ties_merge([a], 0.5), a)  # one shard is the side memory as it is


def test_ten_sequential_edits_hold_in_one_memory_of_three_shards(h):
    old = _top(h, [r.prompt for r in TEN])
    other = h.next_token_logprobs(["Paris is the capital of"])
    memory = None
    for r in TEN:  # one call per edit, as across `--state` runs
        memory = wise(h, r, CFG.replace(shard_size=4), memory=memory)
    assert memory is not None and memory.requests == TEN
    assert [s.edits for s in memory.shards] == [4, 4, 2]
    undo = memory.apply(h.model)
    try:
        s = h.score(
            [r.prompt for r in TEN] * 2, [f" {r.target}" for r in TEN] + [f" {o}" for o in old]
        )
        assert torch.equal(h.next_token_logprobs(["Paris is the capital of"]), other)
    finally:
        undo.revert(h.model)
    held = float((s[:10] > s[10:]).float().mean())  # the target beats the unedited top token
    assert held >= 0.8, held  # measured: 0.9 (0.5 with the ten in one shard)


def test_memory_saves_loads_and_refuses_other_weights_and_bad_files(h, tmp_path):
    memory = wise(h, TEN[:3], CFG.replace(shard_size=2))
    loaded = WiseMemory.load(memory.save(tmp_path / "w.safetensors"))
    assert loaded.requests == memory.requests and loaded.epsilon == memory.epsilon
    assert torch.equal(loaded.side, memory.side)
    assert (loaded.module, loaded.method, loaded.base, loaded.info, loaded.config) == (
        memory.module, "wise", memory.base, memory.info, memory.config,
    )  # fmt: skip
    outputs = []
    for m in (memory, loaded):
        undo = m.apply(h.model)
        outputs.append(h.next_token_logprobs([r.prompt for r in TEN[:3]] + [UNRELATED]))
        undo.revert(h.model)
    assert torch.equal(outputs[0], outputs[1])
    with pytest.raises(LfmError, match="other weights"):
        memory.apply(common.smoke_model("llama", 2).model)
    save_tensors(tmp_path / "g.safetensors", {"x": torch.zeros(1)}, "lfm-edit-grace/1")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    save_tensors(tmp_path / "part.safetensors", {"x": torch.zeros(1)}, "lfm-edit-wise/1")
    for name, msg in (("g", "not a lfm-edit-wise/1 file"), ("junk", "cannot read"),
                      ("part", "not a complete lfm-edit-wise/1 file")):  # fmt: skip
        with pytest.raises(LfmError, match=msg) as e:
            WiseMemory.load(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)
    assert str(e.value).endswith("file (KeyError)")  # the part file lacks its metadata


def test_step_continues_a_memory_and_checks_its_layer(h):
    first, state = wise_step(h, REQ, None, CFG)
    assert state is first
    second, _ = wise_step(h, TEN[0], state, CFG)
    assert second.requests == [REQ, TEN[0]] and second.shards[0].edits == 2
    assert first.shards[0].edits == 1  # the earlier memory is not changed
    with pytest.raises(LfmError, match=r"the earlier memory sits at model\.layers\.1"):
        wise_step(h, TEN[1], state, CFG.replace(layer=0))


def test_config_defaults_and_margins():
    cfg = WiseConfig()
    assert (cfg.alpha, cfg.beta, cfg.gamma, cfg.density, cfg.lr, cfg.steps) == (
        5,
        20,
        10,
        0.2,
        1,
        70,
    )
    with pytest.raises(ConfigError, match=r"alpha .* must be below beta"):
        WiseConfig.build({"alpha": 20, "beta": 5})


def test_default_layer_is_three_quarters_up(h, monkeypatch):
    assert default_layer(h.model) == 1
    monkeypatch.setattr(wise_mod, "num_layers", lambda model: 30)
    assert default_layer(h.model) == 22  # SmolLM2


def test_cli_state_accumulates_across_two_calls(h, tmp_path):
    from typer.testing import CliRunner

    from lfm.cli.edit import app

    h.model.save_pretrained(tmp_path / "m")
    h.tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "cfg.json").write_text(CFG.model_dump_json())
    state = tmp_path / "state.safetensors"

    def run(req: Request, out: str):
        file = tmp_path / f"{out}.jsonl"
        file.write_text(json.dumps(req.to_dict()) + "\n")
        args = ["apply", "--model", str(tmp_path / "m"), "-m", "wise", "--requests", str(file),
                "--config", str(tmp_path / "cfg.json"), "--state", str(state), "-o",
                str(tmp_path / out), "--root", str(tmp_path / "runs"), "--threads", "1"]  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        return res

    run(REQ, "p1.safetensors")
    assert WiseMemory.load(state).requests == [REQ]
    res = run(TEN[0], "p2.safetensors")
    assert "wise: 1 edit(s) on model.layers.1.mlp.down_proj" in res.output
    grown = WiseMemory.load(state)
    assert grown.requests == [REQ, TEN[0]] and grown.shards[0].edits == 2
    assert WiseMemory.load(tmp_path / "p2.safetensors").requests == grown.requests
    res = CliRunner().invoke(
        app,
        [
            "eval",
            str(tmp_path / "p2.safetensors"),
            "--model",
            str(tmp_path / "m"),
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    after = float(res.stdout.strip().splitlines()[-2].split("=")[-1])  # the first request's
    assert after > float(h.score([REQ.prompt], [" Rome"])) + 0.3  # eval installed the memory
    res = CliRunner().invoke(
        app, ["patch-apply", str(tmp_path / "p2.safetensors"), "--model", str(tmp_path / "m"),
              "-o", str(tmp_path / "e")]
    )  # fmt: skip
    assert res.exit_code == 2 and "is a WISE side memory: it changes no weights" in res.output


def _hand_memory(h) -> WiseMemory:
    """A one-shard memory at layer 1's down_proj with a fixed random side memory (no training:
    the router alone is under test); the tests set its ε."""
    module = "model.layers.1.mlp.down_proj"
    delta = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    shard = wise_mod.Shard(torch.ones(32, 64, dtype=torch.bool), delta, 1)
    base = fingerprint(h.model, [module])
    return WiseMemory(module, [shard], [torch.ones(2, 64)], [REQ], CFG.to_dict(), base)


def _scores(h, memory: WiseMemory, **inputs) -> torch.Tensor:
    """Each token's routing score ‖(W_v' − W_v) a‖ in one model call (B, T)."""
    seen = []
    proj = h.model.get_submodule(memory.module)
    handle = proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        with torch.no_grad():
            h.model(**inputs)
    finally:
        handle.remove()
    return torch.nn.functional.linear(seen[0].float(), memory.side).norm(dim=-1)


def test_padding_is_left_out_of_the_routing_score(h):
    """A padded batch gives the short row what it gets alone (not routed), though its padding
    scores above ε. The tiny model's <pad> embedding is zero (so is every padding score): it is
    given a real token's here. The batch is longer than the projection's 32 outputs."""
    emb = h.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[h.tokenizer.pad_token_id] = emb[5]
    long, short = " ".join([UNRELATED] * 4), REQ.prompt  # 36 and 7 tokens
    memory = _hand_memory(h)
    enc = h._batch([long, short], side="left")
    real, score = enc["attention_mask"][1].bool(), _scores(h, memory, **enc)[1]
    assert enc["input_ids"].shape[1] > 32 and score[~real].max() > score[real].max()
    memory.epsilon = float(score[~real].max() + score[real].max()) / 2
    base = h.next_token_logprobs([long, short])
    undo = memory.apply(h.model)
    try:
        edited = h.next_token_logprobs([long, short])
    finally:
        undo.revert(h.model)
    assert torch.equal(edited[1], base[1])
    memory.epsilon = -1.0  # the control: with every row routed the short row changes
    undo = memory.apply(h.model)
    try:
        assert not torch.equal(h.next_token_logprobs([long, short])[1], base[1])
    finally:
        undo.revert(h.model)


def test_a_generation_stays_routed_past_its_prompt(h):
    """`generate` (one prompt: no attention mask): the tokens a routed prompt generates score
    below ε on their own, yet are routed (the logits are those of a side memory always read,
    ε = -1); a new call after it is routed on its own tokens again."""
    memory = _hand_memory(h)
    ids = h.tokenizer([REQ.prompt], return_tensors="pt").input_ids  # 7 tokens

    def generate() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = h.model.generate(
                input_ids=ids, max_new_tokens=3, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=h.tokenizer.pad_token_id,
            )  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    with torch.no_grad():
        first = h.model(input_ids=ids[:, :1]).logits  # the prompt's first token alone
    undo = memory.apply(h.model)
    try:
        memory.epsilon = -1.0
        seq, always = generate()
        score = _scores(h, memory, input_ids=seq)[0]  # the projection's inputs: ε plays no part
        prompt = float(score[: ids.shape[1]].max())
        low = float(torch.cat([score[:1], score[ids.shape[1] : -1]]).max())
        assert low < prompt  # the first token and the generated ones fed back: below the prompt
        memory.epsilon = (prompt + low) / 2
        again, routed = generate()
        with torch.no_grad():
            alone = h.model(input_ids=ids[:, :1]).logits
    finally:
        undo.revert(h.model)
    assert torch.equal(again, seq) and torch.equal(routed, always)
    assert torch.equal(alone, first)  # a new call: routed on its own token, below ε


def test_a_score_equal_to_epsilon_is_not_routed():
    # routed means a score *above* ε: ‖a‖ = 0.5 at ε = 0.5 is not (mutant route 21: `>=`)
    side = torch.eye(2)  # the score of a token is ‖a‖ (exact here)
    a, out = torch.tensor([[[0.5, 0.0]]]), torch.zeros(1, 1, 2)
    new, routed = route(side, 0.5, a, out, None)
    assert routed.tolist() == [False] and torch.equal(new, out)
    assert route(side, 0.49, a, out, None)[1].tolist() == [True]


def test_route_moves_the_side_memory_to_the_inputs_device():
    # the side memory stays on the CPU while the model may sit on a GPU: `route` asks for it
    # on the input's device (mutant route 6: `side.to(None)`); a spy stands in for the GPU
    side, asked = torch.eye(2), []
    to = side.to
    side.to = lambda *args, **kw: asked.append(args) or to(*args, **kw)
    a = torch.tensor([[[3.0, 4.0]]])
    new, routed = route(side, 1.0, a, torch.zeros(1, 1, 2), None)
    assert asked == [(a.device,)] and routed.tolist() == [True] and torch.equal(new, a)


def test_route_moves_an_earlier_routing_to_the_scores_device():
    # `before` (kept from the prompt's call) is asked for on the device of this call's scores
    # (mutant route 27: `before.to(None)`); a spy stands in for the GPU
    side, asked = torch.eye(2), []
    before = torch.tensor([True])
    to = before.to
    before.to = lambda *args, **kw: asked.append(args) or to(*args, **kw)
    quiet = torch.tensor([[[0.1, 0.0]]])  # below ε: routed only by `before`
    new, routed = route(side, 1.0, quiet, torch.zeros(1, 1, 2), None, before)
    assert asked == [(torch.device("cpu"),)] and routed.tolist() == [True]
    assert torch.equal(new, quiet)


def test_route_returns_the_projections_dtype():
    # the side memory's output is computed in float32 and cast to the projection's dtype: a
    # bfloat16 model's layer stays bfloat16 (mutant route 35: `d.to(None)` promotes the routed
    # rows to float32)
    side = torch.eye(2)
    a = torch.tensor([[[3.0, 4.0]], [[0.1, 0.0]]], dtype=torch.bfloat16)
    out = torch.ones(2, 1, 2, dtype=torch.bfloat16)
    new, routed = route(side, 1.0, a, out, None)
    assert new.dtype == torch.bfloat16 and routed.tolist() == [True, False]
    assert torch.equal(new[0], out[0] + a[0]) and torch.equal(new[1], out[1])


def test_call_state_reads_only_a_two_dimensional_attention_mask():
    # a 4-D mask (as some callers pass) or a mapping of masks is not a (B, T) padding mask: no
    # mask, so no row is scored on it (mutant _call_state 7: any mask kept)
    assert _call_state({"attention_mask": torch.ones(1, 1, 3, 3)}) == (None, False)
    assert _call_state({"attention_mask": {"full_attention": torch.ones(1, 1, 3, 3)}})[0] is None
    assert _call_state({"attention_mask": [[1, 1, 0]]})[0] is None


def test_call_state_counts_a_cache_of_one_token_and_a_cache_without_a_length_method():
    # a cache that holds one token continues a generation (mutant _call_state 36: `> 1`); a
    # legacy cache (a tuple of layers, no `get_seq_length`) is read by its length (34)
    class Cache:
        def get_seq_length(self) -> int:
            return 1

    assert _call_state({"cache": Cache()}) == (None, True)
    legacy = ((torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)),)
    assert _call_state({"past_key_values": legacy}) == (None, True)
    assert _call_state({"past_key_values": ()}) == (None, False)


def test_a_memory_refuses_a_model_without_its_module_or_with_other_weights(h):
    memory = _hand_memory(h)
    memory.module = "model.layers.9.mlp.down_proj"
    with pytest.raises(LfmError, match=r"^WISE memory sits at model\.layers\.9\.mlp\.down_proj, "
                       r"which this model lacks$"):  # fmt: skip
        memory.check(h.model)
    other = _hand_memory(h)
    other.base = "0" * 64
    with pytest.raises(LfmError, match=r"^WISE memory was made for other weights \(base 0{12}\)$"):
        other.check(h.model)


def test_routing_loss_by_hand():
    # α = 0.2, β = 1, γ = 1, edit score 0.8, irrelevant scores 0.1 and 0.5:
    # mean relu(s_irr − α) = 0.15, relu(β − s_edit) = 0.2, mean relu(γ − (s_edit − s_irr)) = 0.5
    # (mutants routing_loss 4: `s_irr + α`, 9: `s_edit + s_irr`)
    cfg = WiseConfig(alpha=0.2, beta=1.0, gamma=1.0)
    got = wise_mod.routing_loss(torch.tensor(0.8), torch.tensor([0.1, 0.5]), cfg)
    assert got.item() == pytest.approx(0.85, abs=1e-6)


def test_a_shards_mask_is_drawn_from_its_seed_and_index():
    # the generator seeded with seed · 1,000,003 + index (mutants new_shard 1, 11, 13: torch's
    # global generator; 3, 5: another seed), so two runs draw the same masks
    for seed, index in ((0, 1), (1, 0), (2, 3)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        shard = wise_mod.new_shard((8, 16), 0.3, seed, index)
        assert torch.equal(shard.mask, torch.rand((8, 16), generator=gen) < 0.3)
        assert torch.equal(shard.delta, torch.zeros(8, 16)) and shard.edits == 0


def test_each_edits_trace_starts_at_the_bare_prompts_target_nll(h):
    # the trace records the unedited NLL of the target after the bare prompt (mutants _descend
    # 35-39: `nll_start` missing or None; train_edit 8: the prompt trained with a prefix)
    memory = wise(h, REQ, CFG.replace(steps=3))
    (step,) = memory.info["steps"]
    nll = -float(h.score([REQ.prompt], [" Rome"]))
    assert step["nll_start"] == pytest.approx(nll, abs=1e-5)
    assert step["nll_end"] < step["nll_start"]


def test_a_bfloat16_model_is_edited_in_its_dtype(h):
    # the trained side memory is float32 and its output cast to the projection's dtype, so a
    # bfloat16 model trains and routes (mutant train_edit 18: a float32 layer output, which
    # the next bfloat16 matrix refuses)
    h.model.to(torch.bfloat16)
    memory = wise(h, REQ, CFG.replace(steps=3))
    step = memory.info["steps"][0]
    assert step["nll_end"] < step["nll_start"]
    undo = memory.apply(h.model)
    try:
        assert h.next_token_logprobs([REQ.prompt]).isfinite().all()
    finally:
        undo.revert(h.model)


def test_activations_feed_the_prompt_on_the_models_device(h):
    # the model on the meta device stands for a GPU (mutants activations 5, 7: ids made on the
    # CPU, which SameDevice refuses when the model runs)
    site = wise_mod.edit_site(h.model, 1)
    h.model.to("meta")
    with OnMeta():
        (acts,) = wise_mod.activations(h.model, h.tokenizer, [REQ.prompt], site)
    assert acts.shape == (len(h.tokenizer(REQ.prompt)["input_ids"]), 64)


def test_each_edits_trace_names_its_last_step_routing_loss_and_score(h):
    # stop_nll = 0 is never reached: every step is taken and the trace is that of the last one
    # (mutants _descend 40-47: a part missing or None)
    memory = wise(h, REQ, CFG.replace(steps=3, stop_nll=0))
    (step,) = memory.info["steps"]
    assert set(step) == {"nll_start", "nll_end", "routing", "score", "steps"}
    assert step["steps"] == 2
    assert all(isinstance(step[k], float) for k in ("nll_end", "routing", "score"))
    assert step["routing"] >= 0 and step["score"] > 0  # τ has moved: the edit has a score


def test_an_edit_stops_once_the_nll_is_below_stop_nll_with_every_margin_met(h):
    # only margins met and an NLL *below* stop_nll end training (mutants _descend 48: either;
    # 49: at it; 50, 51: margins unmet; 52: no trace). Margins the tiny model meets in ~30 steps
    cfg = CFG.replace(alpha=0.3, beta=0.35, gamma=0.0)
    first = wise(h, REQ, cfg.replace(stop_nll=1e9))  # stops as soon as the margins hold
    done = first.info["steps"][0]
    assert done["routing"] == 0 and 1 <= done["steps"] < cfg.steps - 1
    # the same edit again continues the shard where the margins already hold
    nll = wise(h, REQ, cfg.replace(steps=1), memory=first).info["steps"][-1]["nll_start"]
    below = wise(h, REQ, cfg.replace(steps=3, stop_nll=nll + 1e-4), memory=first)
    assert below.info["steps"][-1] == {
        "nll_start": nll, "nll_end": nll, "routing": 0.0, "score": pytest.approx(done["score"], rel=0.5),
        "steps": 0,
    }  # fmt: skip
    at = wise(h, REQ, cfg.replace(steps=3, stop_nll=nll), memory=first)  # not below: steps on
    assert at.info["steps"][-1]["steps"] >= 1


def test_the_side_memory_keeps_each_entry_within_the_clamp_on_both_sides(h):
    # a step far larger than the clamp drives entries to exactly ±clamp (mutants _descend 54,
    # 55, 57: one side left unbounded)
    memory = wise(h, REQ, CFG.replace(lr=1e4, clamp=1e-3, steps=2, stop_nll=0))
    delta = memory.shards[0].delta
    assert delta.max().item() == pytest.approx(1e-3) and delta.min().item() == pytest.approx(-1e-3)


def test_a_model_without_its_tokenizer_is_refused_naming_wise(h):
    # mutants wise_step 3, 6, 7: another name in the refusal
    with pytest.raises(LfmError, match=r"^edit/wise needs a LocalModel \(a model with its tok"):
        wise(h.model, REQ, CFG)


def test_ties_merge_keeps_at_least_one_entry_per_shard_and_no_more_at_low_density():
    # density 0.5 of two entries keeps one per shard: a keeps −2, b keeps 3 (mutant ties_merge
    # 10: at least two kept, which would average 1 and 3 into 2)
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])
    assert torch.equal(ties_merge([a, b], 0.5), torch.tensor([[3.0, -2.0]]))
    assert torch.equal(ties_merge([a, b], 0.01), torch.tensor([[3.0, -2.0]]))  # ceil: still one


def test_a_continued_memory_keeps_its_config_layer_and_every_edits_trace(h):
    # ε is act_ratio of the least edit score under the memory's own config (mutants
    # WiseMemory.__post_init__ 2, wise_step 112: the defaults' 0.88); info holds the layer and
    # the traces of the earlier edits then the new ones (wise_step 94-106, 121)
    cfg = CFG.replace(steps=2, act_ratio=0.5)
    first = wise(h, REQ, cfg)
    assert first.epsilon == pytest.approx(0.5 * min(first.edit_scores))
    assert first.info["layer"] == 1 and len(first.info["steps"]) == 1
    later = wise(h, TEN[0], cfg, memory=first)
    assert later.info["layer"] == 1 and later.config["act_ratio"] == 0.5
    assert later.info["steps"][0] == first.info["steps"][0] and len(later.info["steps"]) == 2
    assert later.epsilon == pytest.approx(0.5 * min(later.edit_scores))


def test_a_memory_without_traces_is_continued(h):
    # a memory made by hand (or saved without traces) has no "steps" in its info: continuing it
    # starts the list (mutants wise_step 102, 104: no default for the missing key)
    hand = _hand_memory(h)
    assert "steps" not in hand.info
    later = wise(h, TEN[0], CFG.replace(steps=2), memory=hand)
    assert len(later.info["steps"]) == 1 and later.requests == [REQ, TEN[0]]


MID = Request("The Eiffel Tower is in the city of", "Eiffel Tower", "Rome")  # subject inside
NEIGHBOUR = "The Colosseum is in the city of"  # the same template, another subject


def _token_scores(h, memory, texts):
    site = wise_mod.edit_site(h.model, int(memory.info["layer"]))
    acts = wise_mod.activations(h.model, h.tokenizer, texts, site)
    return [torch.nn.functional.linear(a, memory.side).norm(dim=-1) for a in acts]


def test_subject_routing_fires_on_the_subject_and_leaves_a_neighbour_of_its_template(h):
    """routing="subject": L_a raises the score of the subject's tokens and keeps the prompt's
    other tokens with the x_i, so the highest score is on the subject and a prompt of the same
    template about another subject stays below ε; with the paper's routing ("prompt") the
    highest score is on the template's last token, and the neighbour is routed (measured: 0.365
    against ε 0.337; with "subject" 0.152 against 0.439)."""
    _, start, end = wise_mod.subject_range(h.tokenizer, MID.prompt, MID.subject)
    plain = wise(h, MID, CFG)
    edit, neighbour = _token_scores(h, plain, [MID.prompt, NEIGHBOUR])
    assert not start <= int(edit.argmax()) < end
    assert float(neighbour.max()) > plain.epsilon  # the paper's routing moves the neighbour
    subject = wise(h, MID, CFG.replace(routing="subject"))
    edit, neighbour = _token_scores(h, subject, [MID.prompt, NEIGHBOUR])
    assert start <= int(edit.argmax()) < end
    assert float(edit.max()) > subject.epsilon > float(neighbour.max())
    rest = torch.cat([edit[:start], edit[end:]])
    assert float(rest.max()) < 0.5 * float(edit[start:end].max())


def test_routing_inputs_split_the_prompt_at_the_subject():
    tok = common.smoke_model("llama", 1).tokenizer
    _, start, end = wise_mod.subject_range(tok, MID.prompt, MID.subject)
    prompt = torch.arange(9.0)[:, None].expand(9, 3)  # (T, D_in), one row per token
    irrelevant = [torch.ones(4, 3)]
    same = wise_mod.routing_inputs(tok, MID, prompt, irrelevant, CFG)
    assert same[0] is prompt and same[1] is irrelevant
    inside, outside = wise_mod.routing_inputs(tok, MID, prompt, irrelevant, CFG.replace(routing="subject"))  # fmt: skip
    assert (start, end) == (2, 4) and inside[:, 0].tolist() == [2.0, 3.0]
    assert len(outside) == 2 and outside[0] is irrelevant[0]
    assert outside[1][:, 0].tolist() == [0.0, 1.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert outside[1][0, 0] == 0.0  # the <bos> token is not the subject's

    def one_token(text, return_offsets_mapping=False):  # no <bos>: the prompt is the subject
        return {"input_ids": [7], "offset_mapping": [(0, len(text))]}

    whole = Request("Paris", "Paris", "Rome")
    inside, outside = wise_mod.routing_inputs(one_token, whole, prompt[:1], irrelevant, CFG.replace(routing="subject"))  # fmt: skip
    assert inside[:, 0].tolist() == [0.0] and outside is irrelevant  # no empty text added


def test_n_prefixes_trains_the_target_behind_each_context_prefix(h):
    # the first step's NLL is the mean over the bare prompt and the first n − 1 prefixes
    from lfm.edit.locate import prefixes

    memory = wise(h, REQ, CFG.replace(steps=2, n_prefixes=3))
    (step,) = memory.info["steps"]
    rows = [f"{p} {REQ.prompt}" if p else REQ.prompt for p in prefixes(3)]
    nll = -sum(float(h.score([r], [" Rome"])) for r in rows) / 3
    assert step["nll_start"] == pytest.approx(nll, abs=1e-5)
    assert nll != pytest.approx(-float(h.score([REQ.prompt], [" Rome"])), abs=1e-3)
    for bad in ({"n_prefixes": 0}, {"n_prefixes": 12}, {"routing": "tokens"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            WiseConfig.build(bad)
    cfg = WiseConfig()
    assert (cfg.routing, cfg.n_prefixes) == ("prompt", 1)  # the paper's: bare prompt, all tokens


# ---- `sink`: the first tokens neither route nor get the side memory ----


def test_sink_free_and_past_sink_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0]])
    want = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(wise_mod.sink_free(mask, 1), want)  # a one-token row keeps its token
    assert torch.equal(wise_mod.sink_free(mask, 0), mask.bool())
    a = torch.arange(12.0).view(3, 4)
    assert torch.equal(wise_mod.past_sink(a, 1), a[1:])
    assert torch.equal(wise_mod.past_sink(a[:1], 1), a[:1])


def test_with_a_sink_the_first_real_token_neither_routes_nor_gets_the_side_memory():
    side = torch.zeros(2, 3)
    side[0, 0] = 1.0  # the score of a token is |a_0|
    a = torch.tensor([[[0.0, 0.0, 0.0], [50.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    out = torch.zeros(1, 4, 2)
    mask = torch.tensor([[0, 1, 1, 1]])  # left padding: the sink is position 1
    _, r = route(side, 10.0, a, out, mask)
    assert r.tolist() == [True]  # the sink's score, 50, routes the row
    kept, r = route(side, 10.0, a, out, mask, sink=1)
    assert r.tolist() == [False] and torch.equal(kept, out)  # past it the largest is 2
    low, r = route(side, 1.5, a, out, mask, sink=1)
    assert r.tolist() == [True]
    assert torch.equal(low[0, :2], out[0, :2])  # the padding and the sink: the main memory's
    assert low[0, 2, 0] == 2.0 and low[0, 3, 0] == 1.0  # the others get the side memory


def test_epsilon_is_taken_past_the_sink():
    acts = torch.ones(3, 4)
    acts[0] *= 100  # the first token's input, far the longest (an attention sink)
    shard = wise_mod.Shard(torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4), 1)
    for sink, score in ((0, 400 * 2**0.5), (1, 4 * 2**0.5)):  # ‖Δ a‖ = 4√2 ‖a‖∞ here
        cfg = CFG.replace(sink=sink)
        memory = WiseMemory("m", [shard], [acts], [REQ], cfg.to_dict(), "base")
        assert memory.sink == sink and memory.edit_scores == pytest.approx([score])
        assert memory.epsilon == pytest.approx(cfg.act_ratio * score)


def test_an_edit_with_a_sink_wins_and_scores_its_prompt_past_the_sink(h):
    cfg = CFG.replace(sink=1)
    memory = wise(h, REQ, cfg)
    assert memory.sink == 1
    want = wise_mod.scores(memory.side, [memory.acts[0][1:]])
    assert memory.edit_scores == pytest.approx([float(want[0])])
    undo = memory.apply(h.model)
    try:
        assert _top(h, [REQ.prompt]) == ["Rome"]
    finally:
        undo.revert(h.model)


def test_the_sink_is_left_out_of_the_routing_loss(h):
    tok = h.tokenizer
    prompt = torch.arange(7 * 64.0).view(7, 64)
    irrelevant = [torch.ones(3, 64), torch.ones(1, 64)]
    edit, irr = wise_mod.routing_inputs(tok, REQ, prompt, irrelevant, CFG.replace(sink=1))
    assert torch.equal(edit, prompt[1:]) and [len(x) for x in irr] == [2, 1]
    subject = CFG.replace(sink=1, routing="subject")
    edit, irr = wise_mod.routing_inputs(tok, REQ, prompt, irrelevant, subject)
    _, start, end = wise_mod.subject_range(tok, REQ.prompt, REQ.subject)
    assert start >= 1 and torch.equal(edit, prompt[start:end])
    assert torch.equal(irr[-1], torch.cat([prompt[1:start], prompt[end:]]))


def test_with_a_sink_the_first_tokens_input_never_enters_the_side_memory(h):
    # every gradient step adds δ_t a_tᵀ for the tokens that get the side memory (density 1: no
    # mask), so W_v' − W_v lies in the span of the inputs past each sequence's first token. At
    # block 0 the later tokens attend to the first one's output, so its δ is not zero.
    cfg = CFG.replace(
        sink=1, density=1.0, steps=3, lr=1.0, irrelevant=("The weather was mild.",), layer=0
    )
    seen: list[torch.Tensor] = []
    proj = h.model.get_submodule("model.layers.0.mlp.down_proj")
    hook = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].detach().float()))
    try:
        memory = wise(h, REQ, cfg)
    finally:
        hook.remove()
    past = torch.cat([x[1:] for x in seen])  # (N, D_in)
    _, sv, vh = torch.linalg.svd(past)
    rank = int((sv > sv[0] * 1e-5).sum())
    outside = vh[rank:]  # directions no input past the sink has
    assert rank < past.shape[1] and memory.side.abs().max() > 0
    first = torch.stack([x[0] for x in seen])
    assert (first @ outside.T).norm() > 0.1 * first.norm()  # the first tokens reach outside it
    assert (memory.side @ outside.T).norm() < 1e-4 * memory.side.norm()


# WISE-Retrieve (`shards_per_memory`): several side memories, a query gets its best one


def test_retrieve_by_hand_picks_each_rows_best_memory_against_its_own_epsilon():
    from lfm.edit.wise import retrieve

    # two memories on 2-d inputs: memory 0 reads the first coordinate, memory 1 the second
    sides = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])]
    a = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.5]], [[0.1, 0.1]]])  # (4, 1, 2)
    out = torch.zeros(4, 1, 2)
    # scores: row 0 (2, 0) -> 0; row 1 (0, 3) -> 1; row 2 (1, 1.5) -> 1; row 3 (0.1, 0.3) -> 1
    new, routed, which = retrieve(sides, [0.5, 1.2], a, out, None)
    assert which[:3].tolist() == [0, 1, 1] and routed.tolist() == [True, True, True, False]
    assert torch.equal(new[0], torch.tensor([[2.0, 0.0]]))  # memory 0's output only
    assert torch.equal(new[1], torch.tensor([[0.0, 3.0]]))  # memory 1's
    assert torch.equal(new[2], torch.tensor([[0.0, 1.5]]))  # its best memory, not the sum
    assert torch.equal(new[3], out[3])  # below its best memory's ε: the main memory
    # the ε compared is the chosen memory's: row 2 scores 1.5 on memory 1, over ε_0 but not ε_1
    _, routed, _ = retrieve(sides, [0.5, 2.0], a, out, None)
    assert routed.tolist() == [True, True, False, False]
    # a continued generation keeps the memory its prompt was routed to
    quiet = torch.tensor([[[1.0, 1.0]]])  # scores (1, 3): memory 1 on its own
    before = (torch.tensor([True]), torch.tensor([0]))
    new, routed, which = retrieve(sides, [0.5, 1.2], quiet, torch.zeros(1, 1, 2), None, before)
    assert routed.tolist() == [True] and which.tolist() == [0]
    assert torch.equal(new, torch.tensor([[[1.0, 0.0]]]))


def test_retrieve_keeps_padding_and_the_sink_out_of_every_memorys_score():
    from lfm.edit.wise import retrieve

    sides = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    a = torch.tensor([[[0.0, 9.0], [0.2, 0.0], [0.0, 0.3]]])  # a loud first token
    out = torch.zeros(1, 3, 2)
    _, routed, which = retrieve(sides, [1.0, 1.0], a, out, None)
    assert routed.tolist() == [True] and which.tolist() == [1]  # the first token routes it
    new, routed, _ = retrieve(sides, [1.0, 1.0], a, out, None, sink=1)
    assert routed.tolist() == [False] and torch.equal(new, out)
    _, routed, which = retrieve(sides, [0.25, 0.25], a, out, None, sink=1)
    assert routed.tolist() == [True] and which.tolist() == [1]  # 0.3 against 0.2
    _, routed, which = retrieve(sides, [0.1, 0.1], a, out, torch.tensor([[1, 1, 0]]), sink=1)
    assert which.tolist() == [0]  # the last token is padding: 0.2 on memory 0 is the best


def test_each_side_memory_merges_its_own_shards_with_its_own_epsilon(h):
    cfg = CFG.replace(shard_size=1, shards_per_memory=2, act_ratio=0.5)
    memory = wise(h, TEN[:3], cfg)
    assert [s.edits for s in memory.shards] == [1, 1, 1] and len(memory.sides) == 2
    deltas = [s.delta for s in memory.shards]
    assert torch.equal(memory.sides[0], ties_merge(deltas[:2], cfg.merge_density))
    assert torch.equal(memory.sides[1], deltas[2])
    for e, j in enumerate([0, 0, 1]):  # an edit is scored under its own memory
        want = wise_mod.scores(memory.sides[j], [memory.acts[e]])[0]
        assert memory.edit_scores[e] == pytest.approx(float(want))
    assert memory.epsilons == pytest.approx(
        [0.5 * min(memory.edit_scores[:2]), 0.5 * memory.edit_scores[2]]
    )
    with pytest.raises(LfmError, match="has 2 side memories"):
        _ = memory.side


def test_retrieved_edits_reach_their_own_memory_and_win(h, tmp_path):
    cfg = CFG.replace(shard_size=1, shards_per_memory=1)
    reqs = TEN[1:5]  # single-token targets ("Tokyo" is two tokens here)
    old = _top(h, [r.prompt for r in reqs])
    other = h.next_token_logprobs(["Paris is the capital of"])
    memory = None
    for r in reqs:
        memory = wise(h, r, cfg, memory=memory)
    assert memory is not None and len(memory.sides) == 4
    site = wise_mod.edit_site(h.model, 1)
    acts = wise_mod.activations(h.model, h.tokenizer, [r.prompt for r in reqs], site)
    assert memory.routed(acts) == [0, 1, 2, 3]  # each prompt to the memory it was trained in
    loaded = WiseMemory.load(memory.save(tmp_path / "w.safetensors"))
    assert loaded.epsilons == memory.epsilons
    assert all(torch.equal(x, y) for x, y in zip(loaded.sides, memory.sides, strict=True))
    undo = loaded.apply(h.model)
    try:
        s = h.score([r.prompt for r in reqs] * 2,
                    [f" {r.target}" for r in reqs] + [f" {o}" for o in old])  # fmt: skip
        assert torch.equal(h.next_token_logprobs(["Paris is the capital of"]), other)
    finally:
        undo.revert(h.model)
    assert bool((s[:4] > s[4:]).all())
