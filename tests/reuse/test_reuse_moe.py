"""MoE upcycling (`reuse/moe_upcycle`, `lfm reuse moe`): experts, routers, the folder, bad plans."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lfm import registry
from lfm.access import LocalModel
from lfm.core.tiny import tiny_lm
from lfm.errors import LfmError
from lfm.reuse import moe
from lfm.reuse.moe import MoePlan, routing_accuracy, upcycle_folder

PROMPTS = [
    ["The capital of Italy is Rome.", "Paris is the capital of France."],
    ["Tokyo is a large city in Japan.", "Kyoto is an old city."],
]


def _expert(base, seed, attention=False):
    """A copy of `base` whose MLPs (and attention, if asked) moved by seeded noise."""
    m = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".mlp." in name or (attention and ".self_attn." in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def lms():
    base, tok = tiny_lm("llama", 0)
    return base, tok, [_expert(base, 1), _expert(base, 2)]


def _upcycle(lms, **cfg):
    base, tok, experts = lms
    return registry.run("reuse/moe_upcycle", LocalModel(base, tok), experts, PROMPTS, cfg=cfg)


def _ids(tok, text="Paris is the capital of Italy and Tokyo"):
    return tok(text, return_tensors="pt")["input_ids"]


def _force(model, e):
    """Route every token of every layer to expert `e` alone (top-1, weight 1)."""

    def hook(_m, _args, out):
        logits, scores, index = out
        return logits, torch.ones_like(scores[:, :1]), torch.full_like(index[:, :1], e)

    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


@pytest.mark.parametrize("e", [0, 1])
def test_forced_router_gives_that_experts_output(lms, e):
    base, tok, experts = lms
    net = _upcycle(lms, experts_per_token=1, gate_mode="random").model
    hooks = _force(net, e)
    try:
        with torch.no_grad():
            got, want = net(_ids(tok)).logits, experts[e](_ids(tok)).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the experts differ in their MLPs: the MoE is not the base (nor the other expert)
    assert (got - base(_ids(tok)).logits).abs().max() > 1e-3
    assert (got - experts[1 - e](_ids(tok)).logits).abs().max() > 1e-3


def _by_hand(base, tok, prompts):
    """Per layer: the mean over prompts of the mean post-attention-norm output (the MLP input)
    over the prompt's tokens after the BOS, scaled to unit length."""
    acts = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(
        lambda _m, _a, out, i=i: acts.__setitem__(i, out[0, 1:])) for i, layer in
        enumerate(base.model.layers)]  # fmt: skip
    means = []
    for p in prompts:
        with torch.no_grad():
            base(_ids(tok, p))
        means.append(torch.stack([acts[i].mean(0) for i in range(len(acts))]))
    for h in hooks:
        h.remove()
    return torch.stack(means).mean(0)


def test_hidden_rows_equal_a_hand_computation(lms):
    base, tok, _ = lms
    net = _upcycle(lms, gate_mode="hidden").model
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the hand computation drops it
    want = torch.stack([_by_hand(base, tok, p) for p in PROMPTS], 1)  # (layers, experts, d)
    want = want / want.norm(dim=-1, keepdim=True)
    for i, layer in enumerate(net.model.layers):
        torch.testing.assert_close(layer.mlp.gate.weight, want[i], atol=1e-5, rtol=0)


def test_negative_prompts_are_subtracted(lms):
    base, tok, experts = lms
    neg = [["Berlin is the capital of Germany."], []]
    h = moe.moe_upcycle(LocalModel(base, tok), experts, PROMPTS, negative=neg)
    row = _by_hand(base, tok, PROMPTS[0]) - _by_hand(base, tok, neg[0])
    row = row / row.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(h.model.model.layers[1].mlp.gate.weight[0], row[1], atol=1e-5,
                               rtol=0)  # fmt: skip


def test_random_rows_differ_and_train_routes_better(lms):
    nets = {
        m: _upcycle(lms, gate_mode=m, experts_per_token=1) for m in ("random", "hidden", "train")
    }
    w = {m: h.model.model.layers[0].mlp.gate.weight for m, h in nets.items()}
    assert not torch.allclose(w["random"], w["hidden"], atol=1e-2)
    torch.testing.assert_close(w["random"].norm(dim=-1), torch.ones(2))  # unit rows, like hidden
    # share of (token, layer) pairs routed first to their prompt's expert; measured: random 0.50,
    # hidden 0.80, train 0.85 (tokens such as "." look alike to a random 2-layer model)
    acc = {m: routing_accuracy(h, PROMPTS) for m, h in nets.items()}
    assert acc["train"] > acc["random"] + 0.25 and acc["train"] > acc["hidden"], acc


def test_shared_parts_from_the_base_or_averaged(lms):
    base, tok, _ = lms
    experts = [_expert(base, 3, attention=True), _expert(base, 4, attention=True)]
    name = "model.layers.1.self_attn.q_proj.weight"
    for shared, want in [("base", base.state_dict()[name]),
                         ("average", (experts[0].state_dict()[name] +
                                      experts[1].state_dict()[name]) / 2)]:  # fmt: skip
        h = registry.run("reuse/moe_upcycle", LocalModel(base, tok), experts, PROMPTS,
                         cfg={"shared": shared, "gate_mode": "random"})  # fmt: skip
        torch.testing.assert_close(h.model.state_dict()[name], want)


# ---------------------------------------------------------------------------------------------
# On disk.


@pytest.fixture(scope="module")
def folders(lms, tmp_path_factory):
    base, tok, experts = lms
    root = tmp_path_factory.mktemp("moe")
    for name, m in zip(("base", "a", "b"), [base, *experts], strict=True):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    gpt2, _ = tiny_lm("gpt2", 0)
    gpt2.save_pretrained(root / "gpt2")
    wide, _ = tiny_lm("llama", 5)
    wide.config.intermediate_size = 48
    type(wide)(wide.config).save_pretrained(root / "wide")
    return root


def _plan(root, **changes):
    data = {"base_model": "base", "gate_mode": "hidden",
            "experts": [{"source_model": "a", "positive_prompts": PROMPTS[0]},
                        {"source_model": "b", "positive_prompts": PROMPTS[1]}]}  # fmt: skip
    data.update(changes)
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_folder_loads_in_transformers_and_equals_the_model_in_memory(lms, folders, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    tok = lms[1]
    done = upcycle_folder(MoePlan.load(_plan(folders)), tmp_path / "moe", root=folders,
                          progress=False)  # fmt: skip
    net = AutoModelForCausalLM.from_pretrained(done.out)
    assert isinstance(net, MixtralForCausalLM) and net.config.num_local_experts == 2
    want = _upcycle(lms).model
    with torch.no_grad():
        torch.testing.assert_close(net(_ids(tok)).logits, want(_ids(tok)).logits, atol=1e-5,
                                   rtol=0)  # fmt: skip
    out = net.generate(_ids(AutoTokenizer.from_pretrained(done.out)), max_new_tokens=4,
                       do_sample=False)  # fmt: skip
    assert out.shape[1] == _ids(tok).shape[1] + 4
    from lfm.assets.models import load_model

    handle = load_model(done.out)
    assert type(handle.model).__name__ == "MixtralForCausalLM" and handle.generate(["Paris"])


def _refused(plan_path, root, tmp_path, monkeypatch, match):
    """The plan is a one-line LfmError raised before any tensor or model is read."""
    from lfm.reuse import engine

    def no_read(*_a, **_k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(engine.SafetensorsReader, "get", no_read)
    monkeypatch.setattr("lfm.assets.models.load_model", no_read)
    with pytest.raises(LfmError, match=match) as err:
        upcycle_folder(MoePlan.load(plan_path), tmp_path / "out", root=root, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"base_model": "nowhere"}, "base_model: nowhere is neither a model folder"),
        ({"experts": [{"source_model": "a", "positive_prompts": ["x"]},
                      {"source_model": "wide", "positive_prompts": ["y"]}]},
         "expert 1 has intermediate_size 48, the base 64"),
        ({"base_model": "gpt2"},
         "^base_model is a 'gpt2' model; MoE upcycling builds Mixtral from llama or mistral"),
        ({"experts": [{"source_model": "a", "positive_prompts": [" "]}]}, "a prompt is empty"),
        ({"experts": [{"source_model": "a"}]}, "expert 0 has no positive_prompts"),
        ({"experts_per_token": 3}, "experts_per_token is 3 but there are only 2 experts"),
        ({"shared_experts": []}, "shared_experts: Extra inputs are not permitted"),
        ({"gate_mode": "cheap_embed"}, "gate_mode: Input should be 'hidden', 'random' or 'train'"),
    ],
)  # fmt: skip
def test_bad_plans_are_one_line_errors_before_any_tensor(folders, tmp_path, monkeypatch, change,
                                                         match):  # fmt: skip
    _refused(_plan(tmp_path, **change), folders, tmp_path, monkeypatch, match)


def test_a_failed_write_leaves_nothing(folders, tmp_path, monkeypatch):
    real = moe.tensor_of

    def fail_late(p, *a):
        if p.out == moe.router_name(1):
            raise OSError("disk full")
        return real(p, *a)

    monkeypatch.setattr(moe, "tensor_of", fail_late)
    with pytest.raises(OSError, match="disk full"):
        upcycle_folder(MoePlan.load(_plan(folders, gate_mode="random")), tmp_path / "out",
                       root=folders, progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_folder_and_a_run(folders, tmp_path):
    from lfm.cli.reuse import app

    args = ["moe", str(_plan(folders)), "--out", str(tmp_path / "m"), "-q", "--root",
            str(tmp_path / "runs")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "moe: 2 experts, 2 per token, hidden gates" in res.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert len(list((tmp_path / "runs").iterdir())) == 1
    bad = CliRunner().invoke(app, ["moe", str(_plan(tmp_path, experts_per_token=5)), "--out",
                                   str(tmp_path / "n"), "--root", str(tmp_path / "runs")])  # fmt: skip
    lines = bad.output.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1 and "experts_per_token" in lines[0], bad.output


# ---------------------------------------------------------------------------------------------
# The parts by hand.


def test_configs_with_biases_or_other_sizes_are_refused(lms):
    from lfm.errors import ConfigError

    base = lms[0].config
    names = ["the base", "expert 0", "expert 1"]
    for field in ("attention_bias", "mlp_bias"):
        biased = copy.deepcopy(base)
        setattr(biased, field, True)
        with pytest.raises(ConfigError, match=r"^the base has attention or MLP biases"):
            moe.check_configs(biased, [base, base], names)
    for field in moe.SHAPE_FIELDS:  # a stand-in config: transformers' own check the field types
        other = SimpleNamespace(**{f: getattr(base, f) for f in moe.SHAPE_FIELDS})
        setattr(other, field, "other")
        want = (
            rf"^expert 1 has {field} 'other', the base {getattr(base, field)!r}: experts must "
            r"share the base's architecture$"
        )
        with pytest.raises(moe.ShapeMismatchError, match=want):
            moe.check_configs(base, [base, other], names)
    moe.check_configs(base, [base, copy.deepcopy(base)], names)  # the same sizes pass


def test_mixtral_config_takes_the_bases_sizes_and_the_experts():
    from transformers import LlamaConfig

    base = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                       rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=77,
                       tie_word_embeddings=True)  # fmt: skip
    cfg = moe.mixtral_config(base, 3, 2, torch.bfloat16)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (3, 2)
    assert not cfg.output_router_logits and cfg.architectures == ["MixtralForCausalLM"]
    assert cfg.dtype == torch.bfloat16 and cfg.sliding_window is None
    from transformers import MixtralConfig

    assert set(cfg.to_dict()) <= set(MixtralConfig().to_dict()) | {"dtype"}  # no Llama-only field
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings"):  # fmt: skip
        assert getattr(cfg, f) == getattr(base, f), f


def test_routing_accuracy_is_the_mean_over_experts_of_each_ones_share(lms, tmp_path):
    """Zero gates put every token on expert 0 first (ties go to the lowest index): expert 0's
    share is 1 and the others' 0, so the accuracy is 1/experts however many tokens each has (a
    share pooled over tokens would weigh the longer prompts)."""
    h = _upcycle(lms, gate_mode="random")
    with torch.no_grad():
        for layer in h.model.model.layers:
            layer.mlp.gate.weight.zero_()
    prompts = [["Rome."], ["Tokyo is a large city in Japan, and Kyoto an old city in it."]]
    assert routing_accuracy(h, prompts) == pytest.approx(0.5)
    assert routing_accuracy(h, prompts[::-1]) == pytest.approx(0.5)
    assert routing_accuracy(h, [prompts[0]]) == pytest.approx(1.0)
    from lfm.errors import AccessError

    with pytest.raises(
        AccessError, match=r"^routing_accuracy needs a model in memory, not Ordered"
    ):
        routing_accuracy(h.model.state_dict(), prompts)


def test_train_rows_weigh_each_expert_equally():
    """Adam on the mean over layers of the mean over experts of each expert's mean cross-entropy:
    every expert counts equally, whatever its number of tokens (by hand, five steps)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    init = torch.randn(3, 2, 3, generator=g)  # 3 layers, 2 experts, d = 3
    # expert 0: one prompt of 2 tokens; expert 1: two prompts, 9 tokens (per layer, (tokens, d))
    pos = [[[torch.randn(2, 3, generator=g)] for _ in range(3)],
           [[torch.randn(6, 3, generator=g), torch.randn(3, 3, generator=g)] for _ in range(3)]]  # fmt: skip
    rows = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([rows], lr=0.05)
    for _ in range(5):
        loss = sum(
            F.cross_entropy(torch.cat(p[layer]) @ rows[layer].T,
                            torch.full((len(torch.cat(p[layer])),), e)) / 2
            for layer in range(3) for e, p in enumerate(pos)
        ) / 3  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = moe.train_rows(init, pos, steps=5, lr=0.05)
    torch.testing.assert_close(got, rows.detach(), atol=1e-6, rtol=0)
    assert (got - init).abs().min() > 0.01  # every entry moved
    assert torch.equal(moe.train_rows(init, pos, steps=0, lr=0.05), init)


def test_in_memory_refusals_are_one_line_config_errors(lms):
    from lfm.errors import ConfigError

    base, tok, experts = lms
    with pytest.raises(
        ConfigError,
        match=r"^give the base as a LocalModel: its tokenizer encodes the prompts and goes with "
        r"the MoE$",
    ):
        moe.moe_upcycle(base, experts, PROMPTS)
    from lfm.access import narrow
    from lfm.errors import AccessError

    with pytest.raises(AccessError, match=r"^reuse/moe_upcycle needs WEIGHTS access, but"):
        moe.moe_upcycle(narrow(LocalModel(base, tok), "text"), experts, PROMPTS)
    with pytest.raises(
        AccessError, match=r"^reuse/moe_upcycle needs a model in memory, not OrderedDict$"
    ):
        moe.moe_upcycle(base.state_dict(), experts, PROMPTS)
    cfg = copy.deepcopy(base.config)
    cfg.attention_bias = True
    biased = type(base)(cfg)
    with pytest.raises(ConfigError, match=r"^the base has attention or MLP biases, which Mixtral"):
        moe.moe_upcycle(LocalModel(biased, tok), [biased], [[]],
                        moe.MoeUpcycleConfig(gate_mode="random"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^1 prompt lists for 2 experts; give one per expert$"):
        moe.moe_upcycle(LocalModel(base, tok), experts, PROMPTS[:1])
    for mode in ("hidden", "train"):
        with pytest.raises(
            ConfigError, match=rf"^gate_mode {mode} needs positive prompts for every"
        ):
            registry.run("reuse/moe_upcycle", LocalModel(base, tok), experts, [PROMPTS[0], []],
                         cfg={"gate_mode": mode})  # fmt: skip
    h = registry.run("reuse/moe_upcycle", LocalModel(base, tok), experts, [[], []],
                     cfg={"gate_mode": "random"})  # fmt: skip
    assert h.name == "moe" and h.tokenizer is tok  # random gates need no prompts


def test_in_memory_dtype_and_experts_given_as_state_dicts(lms):
    base, tok, experts = lms
    default = _upcycle(lms, gate_mode="random").model
    assert {p.dtype for p in default.parameters()} == {torch.float32}  # the base's
    half = _upcycle(lms, gate_mode="random", dtype="bfloat16").model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.config.dtype == torch.bfloat16
    for name, p in default.state_dict().items():
        assert torch.equal(half.state_dict()[name], p.to(torch.bfloat16)), name
    # state dicts carry no config: they are checked against the base's, and give the same MoE
    sds = registry.run("reuse/moe_upcycle", LocalModel(base, tok), [e.state_dict() for e in experts],
                       PROMPTS, cfg={"gate_mode": "random"}).model  # fmt: skip
    assert all(torch.equal(t, default.state_dict()[n]) for n, t in sds.state_dict().items())


# ---------------------------------------------------------------------------------------------
# The folder: shared parts, the head, the record, the dtype, an existing folder.


@pytest.fixture(scope="module")
def more(lms, tmp_path_factory):
    """Folders beside the tiny base: an untied base and two experts whose attention moved (the
    base folder also holds a file of its own and a conversion record); a tied base that stores
    its head (as many checkpoints do); an expert holding only its MLP weights; an expert whose
    config.json is damaged."""
    from safetensors.torch import save_file

    base, tok, experts = lms
    root = tmp_path_factory.mktemp("moe-more")
    cfg = copy.deepcopy(base.config)
    cfg.tie_word_embeddings = False
    torch.manual_seed(7)
    untied = type(base)(cfg)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    for name, m in [("ubase", untied), ("ua", _expert(untied, 11, attention=True)),
                    ("ub", _expert(untied, 12, attention=True))]:  # fmt: skip
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "ubase" / "notes.txt").write_text("the base's own notes\n")
    (root / "ubase" / "lfm-source.json").write_text('{"from": "a gguf file"}\n')
    (root / "tiedhead").mkdir()
    base.config.save_pretrained(root / "tiedhead")
    tok.save_pretrained(root / "tiedhead")
    stored = {k: v.clone() for k, v in base.state_dict().items()}
    stored["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints'
    save_file(stored, root / "tiedhead" / "model.safetensors")
    for name, keep in [("mlponly", lambda k: ".mlp." in k), ("broken", lambda k: True),
                       ("nomlp", lambda k: k != "model.layers.1.mlp.down_proj.weight"),
                       ("badshape", lambda k: True)]:  # fmt: skip
        (root / name).mkdir()
        base.config.save_pretrained(root / name)
        sd = {k: v.clone() for k, v in experts[1].state_dict().items() if keep(k)}
        save_file(sd, root / name / "model.safetensors")
    (root / "broken" / "config.json").write_text("{not json")
    sd = {k: v.clone() for k, v in experts[1].state_dict().items()}
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(
        63, sd["model.layers.0.mlp.up_proj.weight"].shape[1]
    )
    save_file(sd, root / "badshape" / "model.safetensors")
    return root


def _untied_plan(tmp_path, **changes):
    return _plan(tmp_path, **{"base_model": "ubase", "gate_mode": "random",
                              "experts": [{"source_model": "ua"}, {"source_model": "ub"}],
                              **changes})  # fmt: skip


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("shared", ["base", "average"])
def test_folder_takes_shared_parts_and_an_untied_head_as_planned(more, tmp_path, shared):
    from safetensors.torch import load_file

    done = upcycle_folder(MoePlan.load(_untied_plan(tmp_path, shared=shared)), tmp_path / "moe",
                          root=more, progress=False)  # fmt: skip
    got = _weights(done.out)
    base, a, b = (load_file(more / n / "model.safetensors") for n in ("ubase", "ua", "ub"))
    for name in ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]:
        want = base[name] if shared == "base" else (a[name] + b[name]) / 2
        torch.testing.assert_close(got[name], want, atol=1e-7, rtol=0)
    assert not torch.equal(a["model.layers.1.self_attn.q_proj.weight"],
                           base["model.layers.1.self_attn.q_proj.weight"])  # fmt: skip
    for e, src in enumerate((a, b)):  # each expert's MLP is its own, whatever is shared
        assert torch.equal(got[moe.expert_name(1, e, "down_proj")],
                           src["model.layers.1.mlp.down_proj.weight"])  # fmt: skip


def test_folder_keeps_the_bases_side_files_and_records_the_plan(more, tmp_path):
    import json

    plan = MoePlan.load(_untied_plan(tmp_path))
    done = upcycle_folder(plan, tmp_path / "moe", root=more, progress=False)
    assert done.folders == [more / "ubase", more / "ua", more / "ub"]
    assert (done.out / "notes.txt").read_text() == "the base's own notes\n"
    assert not (done.out / "lfm-source.json").exists()  # the base's record, not the MoE's
    record = json.loads((done.out / "lfm_moe.json").read_text())
    assert record == {"plan": plan.to_dict(), "folders": [str(f) for f in done.folders]}


def test_a_stored_tied_head_is_left_to_the_loader(more, lms, tmp_path):
    from transformers import AutoModelForCausalLM

    done = upcycle_folder(MoePlan.load(_plan(tmp_path, base_model="tiedhead", gate_mode="random",
                                             experts=[{"source_model": "mlponly"}])),
                          tmp_path / "moe", root=more, progress=False)  # fmt: skip
    got = _weights(done.out)
    assert "lm_head.weight" not in got and not any("inv_freq" in k for k in got)
    assert moe.expert_name(1, 0, "down_proj") in got  # the names after the head were read
    net = AutoModelForCausalLM.from_pretrained(done.out)
    assert torch.equal(net.lm_head.weight, lms[0].model.embed_tokens.weight)


def test_folder_dtype_is_the_plans(more, tmp_path):
    import json

    done = upcycle_folder(MoePlan.load(_untied_plan(tmp_path, dtype="bfloat16")), tmp_path / "moe",
                          root=more, progress=False)  # fmt: skip
    got = _weights(done.out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((done.out / "config.json").read_text())["dtype"] == "bfloat16"
    same = upcycle_folder(MoePlan.load(_untied_plan(tmp_path)), tmp_path / "f32", root=more,
                          progress=False)  # fmt: skip
    assert {t.dtype for t in _weights(same.out).values()} == {torch.float32}  # the base's
    assert json.loads((same.out / "config.json").read_text())["dtype"] == "float32"


def test_an_existing_folder_is_kept_unless_overwrite(more, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "old.txt").write_text("old")
    plan = MoePlan.load(_untied_plan(tmp_path))
    with pytest.raises(LfmError, match=r"moe exists; choose another folder or overwrite it$"):
        upcycle_folder(plan, out, root=more, progress=False)
    assert (out / "old.txt").is_file()
    upcycle_folder(plan, out, root=more, progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_an_expert_with_only_its_mlp_serves_when_the_base_gives_the_rest(more, folders, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    experts = [{"source_model": str(folders / "a")}, {"source_model": "mlponly"}]
    done = upcycle_folder(MoePlan.load(_plan(tmp_path, base_model=str(folders / "base"),
                                             gate_mode="random", experts=experts)),
                          tmp_path / "moe", root=more, progress=False)  # fmt: skip
    assert moe.expert_name(0, 1, "up_proj") in _weights(done.out)
    _refused(_plan(tmp_path, base_model=str(folders / "base"), gate_mode="random",
                   experts=experts, shared="average"),
             more, tmp_path, monkeypatch, r"^expert 1 has no tensor model\.")  # fmt: skip


def test_a_damaged_expert_config_is_named(more, folders, tmp_path, monkeypatch):
    experts = [{"source_model": str(folders / "a")}, {"source_model": "broken"}]
    _refused(_plan(tmp_path, base_model=str(folders / "base"), gate_mode="random",
                   experts=experts), more, tmp_path, monkeypatch,
             r"^expert 1: cannot read .*broken/config\.json")  # fmt: skip


def test_in_memory_an_expert_of_other_sizes_or_missing_shared_parts_is_refused(lms):
    from lfm.reuse.driver import MissingTensorError, ShapeMismatchError

    base, tok, experts = lms
    wide, _ = tiny_lm("llama", 5)
    wide.config.intermediate_size = 48
    with pytest.raises(
        ShapeMismatchError, match=r"^expert 1 has intermediate_size 48, the base 64"
    ):
        moe.moe_upcycle(LocalModel(base, tok), [experts[0], type(wide)(wide.config)], PROMPTS,
                        moe.MoeUpcycleConfig(gate_mode="random"))  # fmt: skip
    with pytest.raises(
        ShapeMismatchError, match=r"^expert 0 has intermediate_size 48, the base 64"
    ):
        moe.moe_upcycle(
            LocalModel(base, tok),
            [LocalModel(type(wide)(wide.config), tok)],
            [[]],
            moe.MoeUpcycleConfig(gate_mode="random"),
        )  # a handle: its module's config
    mlp_only = [{k: v for k, v in e.state_dict().items() if ".mlp." in k} for e in experts]
    h = registry.run("reuse/moe_upcycle", LocalModel(base, tok), mlp_only, PROMPTS,
                     cfg={"gate_mode": "random"})  # fmt: skip
    want = _upcycle(lms, gate_mode="random").model.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in h.model.state_dict().items())
    with pytest.raises(MissingTensorError, match=r"^expert 0 has no tensor model\."):
        registry.run("reuse/moe_upcycle", LocalModel(base, tok), mlp_only, PROMPTS,
                     cfg={"gate_mode": "random", "shared": "average"})  # fmt: skip


@pytest.mark.parametrize(
    "expert, match",
    [
        ("nomlp", r"^expert 1 has no tensor model\.layers\.1\.mlp\.down_proj\.weight$"),
        ("badshape", r"^expert 1: model\.layers\.0\.mlp\.up_proj\.weight is \[63, 32\], "
                     r"the base's \[64, 32\]$"),
    ],
)  # fmt: skip
def test_an_experts_missing_or_misshapen_mlp_is_refused_before_any_read(more, folders, tmp_path,
                                                                      monkeypatch, expert, match):  # fmt: skip
    for shared in ("base", "average"):
        _refused(_plan(tmp_path, base_model=str(folders / "base"), gate_mode="random",
                       shared=shared,
                       experts=[{"source_model": str(folders / "a")}, {"source_model": expert}]),
                 more, tmp_path, monkeypatch, match)  # fmt: skip


def test_a_mistral_base_is_accepted_and_keeps_its_sliding_window():
    from transformers import MistralConfig

    base = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         sliding_window=16)  # fmt: skip
    moe.check_configs(base, [copy.deepcopy(base)], ["the base", "expert 0"])
    cfg = moe.mixtral_config(base, 3, 1, torch.float32)
    assert (cfg.sliding_window, cfg.num_local_experts, cfg.num_experts_per_tok) == (16, 3, 1)
    assert set(cfg.to_dict()) <= set(type(cfg)().to_dict()) | {"dtype"}  # no foreign field
    assert moe.top_k(moe.MoeUpcycleConfig(), 3) == 2 and moe.top_k(moe.MoeUpcycleConfig(), 1) == 1


def test_plan_models_are_folders_or_causal_lm_assets(folders, tmp_path, monkeypatch):
    from lfm.assets.models import MODELS
    from lfm.errors import ConfigError

    encoder = next(n for n, m in MODELS.items() if m.kind != "causal-lm")
    with pytest.raises(
        ConfigError, match=rf"^base_model: {encoder} is a .* model, not a causal LM$"
    ):
        moe.model_folder(encoder, tmp_path, "base_model")
    gguf = next(n for n, m in MODELS.items() if m.kind == "causal-lm")
    info = MODELS[gguf]
    monkeypatch.setitem(MODELS, gguf, dataclasses.replace(info, locate=lambda: tmp_path / "m.gguf"))
    monkeypatch.setattr("lfm.assets.models.convert_gguf", lambda path: ("converted", path))
    assert moe.model_folder(gguf, tmp_path, "x") == ("converted", tmp_path / "m.gguf")
    monkeypatch.setitem(MODELS, gguf, dataclasses.replace(info, locate=lambda: tmp_path / "folder"))
    assert moe.model_folder(gguf, tmp_path, "x") == tmp_path / "folder"
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^x: cfgonly is neither a model folder") as err:
        moe.model_folder("cfgonly", tmp_path, "x")
    assert gguf in str(err.value) and encoder not in str(err.value)  # the causal LMs it knows
    monkeypatch.chdir(folders)  # a relative name not under the plan's folder: the working folder's
    assert moe.model_folder("base", tmp_path, "x") == Path("base")
    assert moe.model_folder("base", folders, "x") == folders / "base"


def test_on_disk_routers_use_the_negative_prompts_and_random_ones_load_no_model(lms, folders,
                                                                              tmp_path, monkeypatch):  # fmt: skip
    from safetensors.torch import load_file

    neg = [["Kyoto is an old city."], ["The capital of Italy is Rome."]]
    experts = [{"source_model": m, "positive_prompts": p, "negative_prompts": q}
               for m, p, q in zip(("a", "b"), PROMPTS, neg, strict=True)]  # fmt: skip
    done = upcycle_folder(MoePlan.load(_plan(tmp_path, experts=experts)), tmp_path / "moe",
                          root=folders, progress=False)  # fmt: skip
    base, tok, ex = lms
    want = registry.run("reuse/moe_upcycle", LocalModel(base, tok), ex, PROMPTS, negative=neg).model
    got = load_file(done.out / "model.safetensors")
    for i in range(base.config.num_hidden_layers):
        torch.testing.assert_close(got[moe.router_name(i)],
                                   want.state_dict()[f"model.layers.{i}.mlp.gate.weight"])  # fmt: skip

    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lfm.assets.models.load_model", no_load)
    upcycle_folder(MoePlan.load(_plan(tmp_path, gate_mode="random")), tmp_path / "rnd",
                   root=folders, progress=False)  # fmt: skip


def test_the_moes_config_is_the_bases_where_an_experts_differs(more, folders, tmp_path):
    """An expert may differ from the base outside the sizes (here its RoPE base and context
    length): the MoE's config takes the base's."""
    import json
    import shutil

    shutil.copytree(folders / "a", tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    cfg["max_position_embeddings"] = 4321
    (tmp_path / "other" / "config.json").write_text(json.dumps(cfg))
    experts = [{"source_model": str(tmp_path / "other")}, {"source_model": str(folders / "b")}]
    done = upcycle_folder(MoePlan.load(_plan(tmp_path, base_model=str(folders / "base"),
                                             gate_mode="random", experts=experts)),
                          tmp_path / "moe", root=more, progress=False)  # fmt: skip
    got = json.loads((done.out / "config.json").read_text())
    base = json.loads((folders / "base" / "config.json").read_text())
    assert got["max_position_embeddings"] == base["max_position_embeddings"] != 4321


def test_a_folder_written_meanwhile_by_another_process_is_kept(folders, tmp_path, monkeypatch):
    """Without `overwrite`, an output folder that appears while the MoE is written (a rival
    process) is kept and the upcycle is refused in one line."""
    out = tmp_path / "out"
    real = moe.tensor_of

    def rival(p, *a):
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
        return real(p, *a)

    monkeypatch.setattr(moe, "tensor_of", rival)
    with pytest.raises(LfmError, match=r"out was written by another process meanwhile; it is kept"):
        upcycle_folder(MoePlan.load(_plan(folders, gate_mode="random")), out, root=folders,
                       progress=False)  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_router_rows_are_scaled_to_unit_length_whatever_their_length():
    rows = moe._unit(torch.tensor([[0.3, 0.4], [0.0, 0.0], [6.0, 8.0]]))
    torch.testing.assert_close(rows, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.6, 0.8]]))
