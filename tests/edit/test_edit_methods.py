"""ROME, MEMIT, AlphaEdit and FT-L edit a tiny model; keys are consistent; inputs are checked;
each method fills its defaults once, at its entry point."""

from __future__ import annotations

import pytest
import torch

from lfm import registry
from lfm.access import Access, LocalModel, narrow
from lfm.edit import (
    AlphaEditConfig,
    FTLConfig,
    MemitConfig,
    Request,
    RomeConfig,
    alphaedit,
    alphaedit_step,
    common,
    ft_l,
    locate,
    memit,
    rome,
)
from lfm.edit.patch import linear_weight
from lfm.edit.rome import rome_defaults, rome_delta
from lfm.edit.site import edit_site, edit_sites
from lfm.errors import AccessError, LfmError

REQ = common.SMOKE_REQUEST  # "The city of the Eiffel Tower" -> " Rome"
# the seed under which " Paris" leads " Rome" on REQ before the edit, in Llama and GPT-2 alike
SEED = 1
# tiny random models have tiny MLP outputs: lift the paper's relative norm limits
STRONG = dict(v_weight_decay=0.0, clamp_norm=1e4, kl_factor=0.0, v_lr=1.0, v_steps=30, n_prefixes=3)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    h = common.smoke_model(request.param, SEED)
    cov = {layer: common.smoke_cov(h.model, h.tokenizer, layer) for layer in (0, 1)}
    return h, cov


def _margin(h: LocalModel) -> float:
    s = h.score([REQ.prompt] * 2, [" Rome", " Paris"])
    return float(s[0] - s[1])


def _edit(name: str, h: LocalModel, cov):
    if name == "rome":
        return rome(h, REQ, RomeConfig(**STRONG), cov=cov)
    if name == "memit":
        return memit(h, REQ, MemitConfig(**{**STRONG, "clamp_norm": 100.0}), cov=cov)
    if name == "alphaedit":
        cfg = AlphaEditConfig(**{**STRONG, "clamp_norm": 100.0}, null_threshold=1e9)
        return alphaedit(h, REQ, cfg, cov=cov)
    return ft_l(h, REQ, FTLConfig(norm_constraint=1.0, lr=3e-2, steps=30))


@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit", "ft_l"])
def test_edit_wins_and_reverts_bit_exactly(lm, name):
    h, cov = lm
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    assert _margin(h) < 0
    patch = _edit(name, h, cov)
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    undo = patch.apply(h.model)
    assert _margin(h) > 0, f"{name} did not make ' Rome' win"
    undo.revert(h.model)
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())


def _c_orthogonal(cov, keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """A random vector k with kᵀC⁻¹k_j = 0 for every column k_j of `keys` (D, P)."""
    c_inv_k = common.solve_cov(cov, keys.double(), ridge)  # (D, P)
    other = torch.randn(
        keys.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    coef = torch.linalg.solve(keys.double().T @ c_inv_k, c_inv_k.T @ other)
    return other - keys.double() @ coef


def test_rome_uses_one_averaged_key_everywhere(lm):
    """r-ROME (`key_constraint="mean"`): the original ROME bug mixed the bare-prompt key with
    the prefix-averaged one; here k* is the mean in every term, so (W + ΔW) k* = v* exactly."""
    h, cov = lm
    site = edit_site(h.model, 0)
    cfg = rome_defaults(RomeConfig(**STRONG, key_constraint="mean"), site)
    delta, trace = rome_delta(h.model, h.tokenizer, REQ, cfg, site, cov[0])
    keys, _ = locate.keys_and_outputs(h.model, h.tokenizer, REQ, site, cfg.n_prefixes)
    assert torch.allclose(trace.key, keys.mean(0)) and not torch.allclose(trace.key, keys[0])
    w = linear_weight(h.model, delta.module).detach()
    new_value = (w + delta.matrix()) @ trace.key
    assert torch.allclose(new_value, trace.value, atol=1e-4 * trace.value.norm())
    # and the update is orthogonal to other keys in the C⁻¹ metric: ΔW k = 0 when kᵀC⁻¹k* = 0
    other = _c_orthogonal(cov[0], trace.key[:, None], cfg.cov_ridge)
    dw = delta.matrix().double()
    assert (dw @ other).norm() < 1e-4 * torch.linalg.matrix_norm(dw, 2) * other.norm()
    # the bare prompt's key gets less than δ: what "each" fixes
    assert not torch.allclose(delta.matrix() @ keys[0], trace.delta, rtol=1e-3)


def test_rome_each_key_gets_exactly_delta(lm):
    """`key_constraint="each"`: ΔW k_j = δ for every prefixed key, the bare prompt's included,
    ΔW is rank one, and keys C⁻¹-orthogonal to all k_j are left alone (smallest such ΔW)."""
    h, cov = lm
    site = edit_site(h.model, 0)
    cfg = rome_defaults(RomeConfig(**STRONG, key_constraint="each"), site)
    delta, trace = rome_delta(h.model, h.tokenizer, REQ, cfg, site, cov[0])
    keys, _ = locate.keys_and_outputs(h.model, h.tokenizer, REQ, site, cfg.n_prefixes)
    dw = delta.matrix().double()
    assert delta.u.shape[1] == 1 and keys.shape[0] == 3
    got = dw @ keys.double().T  # (D_out, P)
    assert torch.allclose(
        got, trace.delta.double()[:, None].expand_as(got), atol=1e-4 * trace.delta.norm()
    )
    other = _c_orthogonal(cov[0], keys.T, cfg.cov_ridge)
    assert (dw @ other).norm() < 1e-4 * torch.linalg.matrix_norm(dw, 2) * other.norm()


def test_narrowed_handles_and_bare_models_are_refused():
    h = common.smoke_model()
    for fn in (rome, memit, alphaedit, ft_l):
        with pytest.raises(AccessError, match=r"needs WEIGHTS access.*only SCORES"):
            fn(narrow(h, Access.SCORES), REQ)
        with pytest.raises(LfmError, match="needs a LocalModel"):  # no tokenizer with it
            fn(h.model, REQ)


def test_bad_input_leaves_model_untouched(lm):
    h, cov = lm
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    with pytest.raises(LfmError, match="does not occur"):
        rome(h, {"prompt": "The Louvre is in", "subject": "Eiffel Tower", "target": "Rome"})
    with pytest.raises(LfmError, match="out of range"):
        rome(h, REQ, RomeConfig(layer=7), cov=cov)
    with pytest.raises(LfmError, match="no edit requests"):
        memit(h, [], cov=cov)
    assert all(torch.equal(before[k], v) for k, v in h.model.state_dict().items())
    assert all(p.requires_grad for p in h.model.parameters())


def test_memit_batch_spreads_over_layers(lm):
    h, cov = lm
    reqs = [REQ, Request("The capital of France is Paris", "France", "Tokyo")]
    for mode, cols in (("mean", 2), ("each", 2 * STRONG["n_prefixes"])):
        cfg = MemitConfig(**{**STRONG, "clamp_norm": 100.0}, key_constraint=mode)
        patch = memit(h, reqs, cfg, cov=cov)
        assert len(patch.deltas) == 2 and {d.u.shape[1] for d in patch.deltas} == {cols}
        assert all(d.matrix().abs().sum() > 0 for d in patch.deltas)


def test_reads_stop_after_the_deepest_module_and_match_a_full_pass(lm):
    from lfm.core.layouts import get_layout, module, module_name
    from lfm.edit.requests import build_batch

    h, _ = lm
    model, batch = h.model, build_batch(h.tokenizer, REQ, locate.prefixes(3), with_target=False)
    blocks = model.get_submodule(get_layout(model).layers)
    rows = torch.arange(len(batch.subject_pos))
    full: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(_m, args, out):
            out = out[0] if isinstance(out, tuple) else out
            full[name] = out[rows, batch.subject_pos]
            if args:
                full[name + ".in"] = args[0][rows, batch.subject_pos]

        return fn

    handles = [module(model, "mlp_out", 0).register_forward_hook(keep("mlp0")),
               blocks[0].register_forward_hook(keep("block0"))]  # fmt: skip
    with torch.no_grad():
        model(**locate._inputs(model, batch))
    for hd in handles:
        hd.remove()
    ran = []
    spy = blocks[1].register_forward_pre_hook(lambda *_: ran.append(1))
    mlp0, block0 = module_name(model, "mlp_out", 0), f"{get_layout(model).layers}.0"
    try:
        ins, outs = locate.read_at_subject(model, batch, [mlp0, block0], [mlp0])
    finally:
        spy.remove()
    assert not ran  # block 1 lies above both reads: the pass stopped before it
    assert torch.equal(ins[mlp0], full["mlp0.in"]) and torch.equal(outs[mlp0], full["mlp0"])
    assert torch.equal(outs[block0], full["block0"])
    with pytest.raises(LfmError, match="no module named"):
        locate.read_at_subject(model, batch, ["no.such.module"])


def test_memit_maps_residual_changes_through_a_post_mlp_norm():
    from lfm.edit.memit import resid_change, value_change

    from conftest import make_lm

    gemma, _ = make_lm("gemma3")
    norm = edit_site(gemma, 0).norm_module(gemma)
    llama = make_lm("llama")[0]
    assert norm is not None and edit_site(llama, 0).norm_module(llama) is None
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)  # a non-trivial gain, 1 + w in [0.5, 1.5]
        norm.weight[:3] = -1.0  # and three dead outputs (gain 0), as Gemma 3 270M has
    g = torch.Generator().manual_seed(0)
    m, m2 = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    r = resid_change(norm, m, m2 - m)  # a residual change the norm can produce
    dm = value_change(norm, m, r)
    out = norm((m + dm).T).T
    assert torch.allclose(out, norm(m.T).T + r, atol=1e-4)  # reached exactly
    assert dm.isfinite().all() and torch.equal(out[:3], torch.zeros(3, 5))
    assert not torch.allclose(dm, r, atol=1e-2)  # and not by writing r as the MLP change
    delta = torch.randn(32, generator=g)
    assert torch.equal(value_change(None, m, r), r)  # no norm: the residual change is the value's
    assert torch.equal(resid_change(None, m, delta), delta[:, None].expand(32, 5))


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_memit_window_and_warning_where_the_mlp_output_is_normed(kind):
    import warnings

    from lfm.edit.memit import edit_layers, warn_if_normed

    from conftest import make_lm

    model, _ = make_lm(kind)  # 2 blocks: default_layer 0
    assert edit_layers(model, None) == ([0] if kind == "gemma3" else [0, 1])
    for layers, warns in (([0], False), ([0, 1], kind == "gemma3")):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warn_if_normed(model, edit_sites(model, layers), "edit/memit")
        assert len([w for w in seen if "did not take" in str(w.message)]) == int(warns)


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_delta_search_defaults_follow_the_layout(kind):
    from conftest import make_lm

    model, tok = make_lm(kind)
    normed = kind == "gemma3"  # Gemma 3 norms the MLP output before the residual
    cov = {0: common.smoke_cov(model, tok, 0)}
    site = edit_site(model, 0)
    assert site.normed == normed
    cfg = RomeConfig(layer=0, v_steps=1, n_prefixes=2, clamp_norm=1e6, stop_nll=0.0)
    # Adam's first step moves every coordinate of δ by the learning rate
    _, trace = rome_delta(model, tok, REQ, rome_defaults(cfg, site), site, cov[0])
    assert trace.delta.abs().max().item() == pytest.approx(0.05 if normed else 0.5, rel=1e-3)
    h = LocalModel(model, tok)
    patch = rome(h, REQ, RomeConfig(layer=0, v_steps=1, n_prefixes=2), cov=cov)
    assert (patch.config["v_lr"], patch.config["stop_nll"]) == (
        (0.05, 0.3) if normed else (0.5, 0.05)
    )
    kept = common.search_defaults(RomeConfig(v_lr=0.2, stop_nll=0.1), site, 0.3)
    assert (kept.v_lr, kept.stop_nll) == (0.2, 0.1)  # values given are kept
    from lfm.edit.memit import NORMED_LAMBDA, PAPER_LAMBDA, memit_defaults

    mcfg = memit_defaults(MemitConfig(), site)  # MEMIT keeps the paper's early stop
    assert (mcfg.v_lr, mcfg.stop_nll) == ((0.05, 0.05) if normed else (0.5, 0.05))
    d_in = linear_weight(model, "model.layers.0.mlp.down_proj").shape[1]
    lam = (NORMED_LAMBDA if normed else PAPER_LAMBDA) * d_in  # λ: a third of the paper's if normed
    assert mcfg.mom2_update_weight == pytest.approx(lam)
    assert memit_defaults(MemitConfig(mom2_update_weight=7.0), site).mom2_update_weight == 7.0
    # the δ search and MEMIT's solve refuse settings left unfilled instead of guessing them
    with pytest.raises(LfmError, match="v_lr and stop_nll are unset"):
        rome_delta(model, tok, REQ, cfg, site, cov[0])


def test_each_method_fills_its_defaults_exactly_once(lm, monkeypatch):
    """The defaults are filled at the entry point only (once per edit, also for a sequence of
    ROME requests), and the patch records the values used."""
    h, cov = lm
    calls: list[int] = []
    real = common.search_defaults

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(common, "search_defaults", counted)
    small = dict(v_steps=1, n_prefixes=2)
    second = Request("The old city of Kyoto", "Kyoto", "Berlin")
    runs = {
        "rome": lambda: rome(h, [REQ, second], RomeConfig(**small), cov=cov),
        "memit": lambda: memit(h, REQ, MemitConfig(**small), cov=cov),
        "alphaedit": lambda: alphaedit(h, REQ, AlphaEditConfig(**small), cov=cov),
        "alphaedit_step": lambda: alphaedit_step(h, REQ, None, AlphaEditConfig(**small), cov=cov)[0],
    }  # fmt: skip
    for name, run in runs.items():
        calls.clear()
        patch = run()
        assert len(calls) == 1, f"{name} filled its defaults {len(calls)} times"
        assert patch.config["v_lr"] == 0.5 and patch.config["stop_nll"] == 0.05, name
        if name != "rome":
            assert patch.config["mom2_update_weight"] is not None, name


def test_methods_run_by_name_with_a_subclassed_config(lm):
    """A user's subclass of a method's config is still that method's config; the method is the
    one named, whatever the config's class."""
    h, cov = lm

    class MyRome(RomeConfig):
        pass

    patch = registry.run("edit", "rome", h, REQ, cfg=MyRome(**STRONG), cov=cov)
    assert patch.method == "rome" and patch.config["v_lr"] == STRONG["v_lr"]
    assert torch.equal(patch.deltas[0].u, rome(h, REQ, RomeConfig(**STRONG), cov=cov).deltas[0].u)
    patch = registry.run("edit/ft-l", h, REQ, cfg={"steps": 2})  # hyphens read as underscores
    assert patch.method == "ft_l" and patch.config["steps"] == 2


def test_alphaedit_leaves_the_preserved_directions_alone(lm):
    """AlphaEdit's update lies in the null space of C: ΔW u = 0 for every eigenvector u of C
    whose eigenvalue is above the threshold. Fails if the projection P is the identity."""
    h, cov = lm
    cfg = AlphaEditConfig(**{**STRONG, "clamp_norm": 100.0})
    for layer, c in cov.items():
        vals, vecs = torch.linalg.eigh(c)
        threshold = float(vals[len(vals) // 2])  # half the directions null, half preserved
        kept = vecs[:, vals >= threshold].float()  # (D_in, k): what C says the model uses
        site_cfg = cfg.replace(layers=(layer,), null_threshold=threshold)
        dw = alphaedit(h, REQ, site_cfg, cov=cov).deltas[0].matrix()
        assert (dw @ kept).norm() < 1e-4 * dw.norm()
        everywhere = alphaedit(h, REQ, site_cfg.replace(null_threshold=1e9), cov=cov)
        dw_all = everywhere.deltas[0].matrix()  # P = I: the same solve without the projection
        assert (dw_all @ kept).norm() > 1e-2 * dw_all.norm()


def _deltas(patch) -> dict[str, torch.Tensor]:
    return {d.module: d.matrix() for d in patch.deltas}


@pytest.mark.parametrize("name", ["rome", "ft_l", "memit"])
def test_negative_layers_count_from_the_top_and_out_of_range_names_the_range(lm, name):
    h, cov = lm
    quick = dict(v_steps=3, n_prefixes=2)
    run = {
        "rome": lambda layer: rome(h, REQ, RomeConfig(layer=layer, **quick), cov=cov),
        "ft_l": lambda layer: ft_l(h, REQ, FTLConfig(layer=layer, steps=3)),
        "memit": lambda layer: memit(h, REQ, MemitConfig(layers=(layer,), **quick), cov=cov),
    }[name]
    top, below = _deltas(run(1)), _deltas(run(-1))  # 2 blocks: −1 is block 1
    assert list(top) == list(below) == [edit_site(h.model, 1).module]
    assert all(torch.equal(top[k], below[k]) for k in top)
    for bad in (2, -3):
        with pytest.raises(LfmError, match=rf"layer {bad} is out of range .* 0 … 1, or −2 … −1"):
            run(bad)


def test_memit_layers_are_taken_ascending_and_one_block_named_twice_is_refused(lm):
    h, cov = lm
    cfg = dict(v_steps=3, n_prefixes=2)
    up = _deltas(memit(h, REQ, MemitConfig(layers=(0, 1), **cfg), cov=cov))
    down = _deltas(memit(h, REQ, MemitConfig(layers=(-1, 0), **cfg), cov=cov))
    assert list(up) == list(down) and all(torch.equal(up[k], down[k]) for k in up)
    with pytest.raises(LfmError, match="name a block twice"):
        memit(h, REQ, MemitConfig(layers=(1, -1), **cfg), cov=cov)


def test_a_statistics_budget_below_the_key_width_is_refused(lm):
    h, _ = lm
    d_in = edit_site(h.model, 0).d_in
    with pytest.raises(LfmError, match=f"stats_tokens={d_in - 1} is too small.*D_in = {d_in}"):
        rome(h, REQ, RomeConfig(v_steps=2, n_prefixes=2, stats_tokens=d_in - 1))


def test_alphaedit_update_is_orthogonal_to_the_preserved_keys(lm):
    """With C's large-eigenvalue span as the preserved keys, AlphaEdit's ΔW maps them to zero;
    with the projection off (a threshold above every eigenvalue: P = I) it does not."""
    h, cov = lm
    vals, vecs = torch.linalg.eigh(cov[0].double())
    half = len(vals) // 2
    kept = vecs[:, half:]  # the preserved keys' span: eigenvalue 1, far above the threshold
    eig = torch.cat([torch.full((half,), 1e-4), torch.ones(half)]).double()
    c = vecs @ torch.diag(eig) @ vecs.T
    cfg = AlphaEditConfig(**{**STRONG, "clamp_norm": 100.0}, layers=(0,), null_threshold=1e-2)

    def moved(cfg) -> float:
        dw = alphaedit(h, REQ, cfg, cov={0: c}).deltas[0].matrix().double()
        return float((dw @ kept).norm() / (torch.linalg.matrix_norm(dw, 2) * kept.norm()))

    assert moved(cfg) < 1e-6
    assert moved(cfg.replace(null_threshold=1e9)) > 1e-2


def test_a_post_mlp_norm_in_bfloat16_is_applied_in_its_own_dtype():
    """MEMIT's residual change through the norm is the bf16 model's own: the MLP output is cast
    to the norm's dtype, as the model feeds it, not normed in float32 (`_apply`)."""
    from lfm.edit.memit import resid_change

    from conftest import make_lm

    gemma = make_lm("gemma3")[0].to(torch.bfloat16)
    norm = edit_site(gemma, 0).norm_module(gemma)
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    m, delta = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    with torch.no_grad():
        want = norm((m + delta).T.bfloat16()).T.float() - norm(m.T.bfloat16()).T.float()
    got = resid_change(norm, m, delta)
    assert got.dtype == torch.float32 and torch.equal(got, want)


# What mutation testing (`make mutate AREA=edit`) found untested in `lfm.edit.ftl`: the loss's
# value against `stop_nll`, the refusals' name and the progress line.


def test_ft_l_stops_before_its_first_step_once_the_target_nll_is_below_stop_nll():
    """FT-L's loss is the target's NLL under the model (log-softmax over the vocabulary): a
    `stop_nll` just above it stops before any step (ΔW = 0), one just below takes a step."""
    # mutant _nll 22 (the log-softmax over the positions)
    h = common.smoke_model("llama", SEED)
    nll = -float(h.score([REQ.prompt], [f" {REQ.target}"])[0])  # the target is one token
    over = ft_l(h, REQ, FTLConfig(steps=1, stop_nll=nll + 1e-3))
    under = ft_l(h, REQ, FTLConfig(steps=1, stop_nll=nll - 1e-3))
    assert not over.deltas[0].matrix().any()
    assert under.deltas[0].matrix().abs().max() == pytest.approx(5e-4)  # one Adam step of lr


def test_ft_l_refusals_name_edit_ft_l():
    # mutants ft_l 3, 6, 7
    h = common.smoke_model()
    msg = r"^edit/ft_l needs WEIGHTS access, but the handle gives only SCORES$"
    with pytest.raises(AccessError, match=msg):
        ft_l(narrow(h, Access.SCORES), REQ)
    with pytest.raises(LfmError, match=r"^edit/ft_l needs a LocalModel \(a model with its tok"):
        ft_l(h.model, REQ)


def test_ft_l_says_its_requests_are_tuned_together_with_the_step_count():
    # mutant ft_l 17
    from lfm.edit import progress

    said: list[str] = []
    second = Request("The old city of Kyoto", "Kyoto", "Berlin")
    with progress.reporting(said.append):
        ft_l(common.smoke_model(), [REQ, second], FTLConfig(steps=2))
    assert said == ["edits 1-2/2 tuned together (2 steps)"]


def test_ft_l_keeps_every_entry_of_the_change_within_its_linf_bound_on_both_sides():
    """The L∞ constraint is FT-L's defining step: a rate well above the bound drives entries to
    both -ε and +ε, and none past them (mutants ftl_delta 35-38: one side or the other left
    open)."""
    h = common.smoke_model("llama", SEED)
    eps = 1e-3
    patch = ft_l(h, [REQ, Request("The old city of Kyoto", "Kyoto", "Berlin")],
                 FTLConfig(steps=3, lr=1e-2, norm_constraint=eps))  # fmt: skip
    d = patch.deltas[0].matrix()
    assert float(d.max()) == pytest.approx(eps) and float(d.min()) == pytest.approx(-eps)
    assert float(d.abs().max()) <= eps * (1 + 1e-6)


def test_ft_l_goes_on_at_a_loss_equal_to_stop_nll():
    """It stops once the NLL is *below* `stop_nll` (mutant ftl_delta 33: at or below)."""
    from lfm.edit import ftl
    from lfm.edit.requests import build_batch
    from lfm.edit.site import edit_site

    h = common.smoke_model("llama", SEED)
    site = edit_site(h.model, FTLConfig().layer)
    w0 = site.projection(h.model).weight.detach()
    nll = ftl._nll(h.model, {f"{site.module}.weight": w0}, build_batch(h.tokenizer, REQ, [""]))
    at = ft_l(h, REQ, FTLConfig(steps=1, stop_nll=nll.item()))
    assert at.deltas[0].matrix().abs().max() == pytest.approx(5e-4)  # one step was taken


def test_rank_one_each_by_hand_with_its_ridge():
    # keys e1, e2 and C = I with ridge 0.5: (C + 0.5 I)⁻¹K = K/1.5, the Gram K'ᵀ… = I/1.5 gets
    # 0.5 · its mean diagonal (1/3) added: I, so l = K/1.5 · 1 = (2/3, 2/3, 0) (mutants
    # rank_one_each: the ridge subtracted, divided by the mean)
    from lfm.edit.rome import rank_one_each

    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    u, left = rank_one_each(keys, torch.tensor([1.0, -2.0]), torch.eye(3, dtype=torch.float64), 0.5)
    assert torch.equal(u, torch.tensor([[1.0], [-2.0]]))
    assert torch.allclose(left, torch.tensor([[2 / 3], [2 / 3], [0.0]]), atol=1e-7)
    assert left.dtype == torch.float32


def test_stack_puts_each_requests_factors_side_by_side():
    # several sequential ROME requests make one delta of rank n: U = [u₁ u₂], V = [v₁ v₂]
    # (mutants stack 15, 20: the factors stacked along the rows)
    from lfm.edit.patch import Delta
    from lfm.edit.rome import stack

    gen = torch.Generator().manual_seed(0)
    u1, u2, v1, v2 = (torch.randn(n, 1, generator=gen) for n in (4, 4, 3, 3))
    d = stack([Delta("m", u1, v1), Delta("m", u2, v2)])
    assert d.module == "m" and torch.equal(d.u, torch.cat([u1, u2], 1))
    assert torch.equal(d.v, torch.cat([v1, v2], 1))
    assert torch.allclose(d.matrix(), u1 @ v1.T + u2 @ v2.T)


def test_rome_refuses_a_model_without_its_tokenizer_naming_rome(lm):
    h, cov = lm
    with pytest.raises(LfmError, match=r"^edit/rome needs a LocalModel \(a model with its tok"):
        rome(h.model, REQ, RomeConfig(**STRONG), cov=cov)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_memit_and_alphaedit_name_themselves_in_patch_refusal_and_warning(method):
    # mutants memit _edit 1-7, 10, 33, 55: another name in the patch, the refusal or the
    # warning on a normed layout
    import warnings

    from conftest import make_lm

    fn, cfg = {"memit": (memit, MemitConfig), "alphaedit": (alphaedit, AlphaEditConfig)}[method]
    h = LocalModel(*make_lm("gemma3"))
    cov = {layer: common.smoke_cov(h.model, h.tokenizer, layer) for layer in (0, 1)}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        patch = fn(h, REQ, cfg(layers=[0, 1], v_steps=1, n_prefixes=1), cov=cov)
    assert patch.method == method
    assert [str(w.message).split(":")[0] for w in seen if "did not take" in str(w.message)] == [
        method
    ]
    with pytest.raises(LfmError, match=rf"^edit/{method} needs a LocalModel \(a model with its"):
        fn(h.model, REQ, cfg(v_steps=1), cov=cov)


def test_rome_reads_the_prefixed_outputs_once_and_records_v_star(lm):
    # the δ search reuses the keys pass's MLP outputs (mutants rome_delta 21, 27: read again);
    # the trace's v* is W k* + δ (31: W k* − δ)
    h, cov = lm
    site = edit_site(h.model, 1)
    cfg = rome_defaults(RomeConfig(**{**STRONG, "v_steps": 2}), site)
    calls = []
    read = locate.keys_and_outputs

    def counted(*args, **kwargs):
        calls.append(1)
        return read(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(locate, "keys_and_outputs", counted)
        _, trace = rome_delta(h.model, h.tokenizer, REQ, cfg, site, cov[1])
    assert len(calls) == 1 and trace.module == site.module  # (mutants rome_delta 61, 65)
    assert set(trace.info) >= {"nll_start", "nll_end"}
    w = linear_weight(h.model, site.module).detach().float()
    assert torch.allclose(trace.value, w @ trace.key + trace.delta, atol=1e-6)


@pytest.mark.parametrize(
    ("d_out", "d_in", "rank", "dense"),
    [(4, 4, 2, False), (4, 4, 3, True), (6, 2, 1, False), (6, 2, 2, True), (2, 6, 2, True)],
)
def test_memit_stores_factors_unless_the_matrix_is_smaller(d_out, d_in, rank, dense):
    # r·(D_out + D_in) numbers against D_out·D_in; a tie keeps the factors (mutants
    # _low_rank_or_dense 1-13)
    from lfm.edit.memit import _low_rank_or_dense

    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(d_out, rank, generator=g), torch.randn(d_in, rank, generator=g)
    d = _low_rank_or_dense("m", u, v)
    assert d.module == "m" and (d.dense is not None) == dense and (d.u is None) == dense
    assert torch.allclose(d.matrix(), u @ v.T)


def test_memit_default_window_is_five_blocks_around_the_middle_or_three_ending_there():
    # 24 blocks: default_layer 4 (a sixth of the depth), the window [mid − 2, mid + 2], or
    # [mid − 2, mid] where the MLP output is normed (mutants edit_layers 18, 33, 36)
    from lfm.edit.memit import edit_layers
    from lfm.edit.site import default_layer

    from conftest import deep_lm

    for kind in ("llama", "gemma3"):
        model, _ = deep_lm(kind, 24)
        mid = default_layer(model)
        assert mid == 4
        top = mid if kind == "gemma3" else mid + 2
        assert edit_layers(model, None) == list(range(mid - 2, top + 1)), kind


def test_memit_update_refuses_an_unfilled_lambda_and_alphaedit_solves_by_hand():
    # MEMIT's λ comes from memit_defaults (mutants layer_update 5-7: the message); AlphaEdit's
    # V = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K with α = alpha_l2 · tr(C)/D (26: K_p subtracted,
    # 30: −αI)
    from lfm.edit.memit import layer_update, null_projector

    k = torch.tensor([[1.0], [2.0], [3.0]])
    with pytest.raises(
        LfmError, match=r"^mom2_update_weight is unset: fill it with memit_defaults$"
    ):
        layer_update(k, torch.eye(3, dtype=torch.float64), MemitConfig())
    cov = torch.diag(torch.tensor([5.0, 1e-3, 2e-3], dtype=torch.float64))
    prior = torch.tensor([[0.0], [1.0], [-1.0]])
    cfg = AlphaEditConfig(alpha_l2=2.0)
    p = null_projector(cov, cfg.null_threshold)
    assert torch.allclose(p, torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)))
    kd, pd = k.double(), prior.double()
    alpha = 2.0 * (5.0 + 1e-3 + 2e-3) / 3
    want = torch.linalg.solve(
        p @ (kd @ kd.T + pd @ pd.T) + alpha * torch.eye(3, dtype=torch.float64), p @ kd
    )
    got = layer_update(k, cov, cfg, prior)
    assert got.dtype == torch.float32 and torch.allclose(got, want.float(), atol=1e-7)
    assert not torch.allclose(got, layer_update(k, cov, cfg), atol=1e-4)  # the prior counts


def _memit_setup(kind: str, layers: list[int], **kw):
    from lfm.edit.memit import memit_defaults

    from conftest import make_lm

    h = LocalModel(*make_lm(kind))
    sites = edit_sites(h.model, layers)
    for s in edit_sites(h.model, [0, 1]):
        if s.norm_module(h.model) is not None:  # the tiny model's MLP outputs are ~1e-3 long:
            s.norm_module(h.model).eps = 1e-12  # its norm's ε would make it scale-dependent
    base = dict(v_steps=5, v_lr=0.5, clamp_norm=1e4, kl_factor=0.0, v_weight_decay=0.0,
                n_prefixes=1, key_constraint="mean", use_cov=False, mom2_update_weight=1e-12)  # fmt: skip
    return h, sites, memit_defaults(MemitConfig(layers=layers, **{**base, **kw}), sites[-1])


def _at_subject(h, last, site):
    from lfm.edit.memit import resid_and_keys

    return resid_and_keys(h.model, h.tokenizer, [REQ], last, site, 1, each=True)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_memit_moves_the_last_residual_by_what_delta_makes_there_sharing_it_among_layers(kind):
    """With C = I and a tiny λ the normal equations are met almost exactly: the residual after
    the last edited block moves by z − h = (what δ at its MLP output makes of the residual, through
    a post-MLP norm where there is one), and without a norm whether one block or two carry the
    change; with two, the lower one's MLP output takes (z − h)/2 (mutants memit_deltas 55, 64, 127, 133: the norm
    skipped; 87: the mean over all entries; 134-136: another share)."""
    from lfm.edit.memit import _delta, resid_change

    h, (s1,), cfg = _memit_setup(kind, [1])
    h0, _, m = _at_subject(h, s1, s1)
    delta = _delta(h.model, h.tokenizer, REQ, s1, cfg, h0[:, 0], m.T)
    want = resid_change(s1.norm_module(h.model), m, delta)  # z − h, (D, 1)
    assert want.norm() > 0.1 * h0.norm()
    # through a norm only a change of δ's own kind is reached exactly: one block there
    for layers in ([1], [0, 1]) if kind == "llama" else ([1],):
        patch = memit(h, REQ, cfg.replace(layers=layers))
        undo = patch.apply(h.model)
        try:
            moved = _at_subject(h, s1, s1)[0] - h0
        finally:
            undo.revert(h.model)
        assert torch.allclose(moved, want, atol=1e-3 * want.norm()), (layers, moved, want)
    if kind == "llama":  # no norm: the lower block's MLP output takes half of z − h
        s0 = edit_sites(h.model, [0])[0]
        m0 = _at_subject(h, s0, s0)[2]
        lower = memit(h, REQ, cfg.replace(layers=[0, 1])).deltas[0]
        with common.temporarily(h.model, [lower]):
            share = _at_subject(h, s0, s0)[2] - m0
        assert torch.allclose(share, want / 2, atol=1e-3 * want.norm()), (share, want)


def test_memit_clamps_delta_against_the_residual_and_reuses_the_outputs_it_read():
    # MEMIT's ‖δ‖ ≤ clamp_norm · ‖h‖, the residual's norm, not the MLP output's (mutants _delta
    # 4, 5: another norm of the outputs); the δ search is given the outputs already read, and
    # reads none again (11, 17)
    from lfm.edit.memit import _delta

    h, (s1,), cfg = _memit_setup("llama", [1], v_lr=5.0)
    h0, _, m = _at_subject(h, s1, s1)
    delta = _delta(h.model, h.tokenizer, REQ, s1, cfg.replace(clamp_norm=0.01), h0[:, 0], m.T)
    assert delta.norm().item() == pytest.approx(0.01 * h0.norm().item(), rel=1e-4)
    calls = []
    read = locate.keys_and_outputs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(locate, "keys_and_outputs", lambda *a, **k: calls.append(1) or read(*a, **k))
        memit(h, REQ, cfg)
    assert calls == []


@pytest.mark.parametrize("mode", ["each", "mean"])
def test_memit_weighs_each_prefixed_key_by_one_over_root_p(mode):
    # "each": the P = 3 prefixed columns of a request weigh 1/√P, so R Kᵀ averages them; "mean":
    # one column, weight 1. The keys the first layer used show it (mutants memit_deltas 51-53,
    # 101-103, 150). Without C (use_cov off), C = I (141: the config not read)
    from lfm.edit.memit import memit_deltas, resid_and_keys

    h, sites, cfg = _memit_setup("llama", [0, 1], n_prefixes=3, key_constraint=mode)
    deltas, used = memit_deltas(h.model, h.tokenizer, [REQ], cfg, sites, None)
    keys = resid_and_keys(h.model, h.tokenizer, [REQ], sites[-1], sites[0], 3, mode == "each")[1]
    assert keys.shape[1] == (3 if mode == "each" else 1)
    weight = 3**-0.5 if mode == "each" else 1.0
    assert torch.allclose(used[0], keys.double() * weight, atol=1e-6)
    assert len(deltas) == 2


def test_memit_reads_every_layers_statistics_in_one_pass_with_the_configs_budget(monkeypatch):
    # prefetch: one `second_moments` call for all edited layers, with the config's corpus, token
    # budget and article cap (mutants prefetch_covariances 3: one pass per layer; 10: the
    # estimator's defaults)
    from lfm.edit import stats

    h, sites, cfg = _memit_setup("llama", [0, 1], use_cov=True, stats_tokens=100, stats_max_len=9)
    seen = []

    def fake(model, tok, layers, *args):
        seen.append((list(layers), *args))
        return {layer: torch.eye(sites[0].d_in, dtype=torch.float64) for layer in layers}

    monkeypatch.setattr(stats, "second_moments", fake)
    monkeypatch.setattr(stats, "second_moment", lambda *a: pytest.fail("one layer at a time"))
    memit(h, REQ, cfg)
    assert seen == [([0, 1], "bbc-news", 100, 9)]


def test_value_change_is_the_least_change_along_the_reachable_direction():
    """Through the norm, Δm is the point c·u nearest m on the direction u that reaches r (so Δm
    ⟂ m + Δm), or, where u points away from m, the same direction at m's length; dead outputs
    (gain 0) get the length that makes rms(u) = 1 even when m is short there (mutants
    value_change 54, 62: that length floored; 64-69: another c; 79: c ≤ 1 sent to the fallback;
    80-83: the fallback's length; resid_change 3, 13: a (D, cols) change read as one column)."""
    from lfm.edit.memit import resid_change, value_change

    from conftest import make_lm

    gemma, _ = make_lm("gemma3")
    norm = edit_site(gemma, 0).norm_module(gemma)
    norm.eps = 1e-12  # scale-invariant: a short c·u is not pulled by ε
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)
        norm.weight[:3] = -1.0  # three dead outputs
    g = torch.Generator().manual_seed(1)
    m = torch.randn(32, 6, generator=g)
    m2 = m + 0.5 * torch.randn(32, 6, generator=g)  # a nearby target: u points along m
    m[:3] *= 0.05  # short where the gain is dead: the dead part's norm is below 1
    m2[:3] *= 0.05
    m2[:, 5] = -m[:, 5]  # the last column reverses: u points away from m
    r = resid_change(norm, m, m2 - m)
    dm = value_change(norm, m, r)
    assert torch.allclose(norm((m + dm).T).T, norm(m.T).T + r, atol=1e-4)  # reached exactly
    new = m + dm
    cos = (dm * new).sum(0) / (dm.norm(dim=0) * new.norm(dim=0))
    assert cos[:5].abs().max() < 1e-4  # the nearest point: Δm ⟂ m + Δm
    c = new.norm(dim=0) / 32**0.5  # m + Δm = c·u with rms(u) = 1: ‖u‖ = √32
    assert (c[:5] < 1).any() and (c[:5] > 1).any()  # c on both sides of 1
    assert new[:, 5].norm().item() == pytest.approx(m[:, 5].norm().item(), rel=1e-5)  # fallback
    # a change no MLP output can make (4 × the output's size): u is longer than rms 1 allows,
    # and Δm is still the nearest point on it (mutant 69: ‖u‖² taken as D)
    far = value_change(norm, m[:, :1], 4 * norm(m2[:, :1].T).T)
    reach = m[:, :1] + far
    assert ((far * reach).sum() / (far.norm() * reach.norm())).abs() < 1e-4
    assert torch.equal(resid_change(None, m, m2 - m), m2 - m)  # no norm: (D, cols) as given
    one = m2[:, 0] - m[:, 0]
    assert torch.allclose(resid_change(norm, m[:, :1], one), r[:, :1], atol=1e-6)


def test_solve_cov_by_hand_and_on_the_covariances_device():
    # (C + ridge · tr(C)/D · I)⁻¹ rhs: C = diag(2, 4), ridge 0.5 adds 1.5 (mutants solve_cov 4,
    # 6); the right-hand side is moved to C's device, the meta device standing for a GPU (17)
    from conftest import SameDevice

    cov = torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64))
    got = common.solve_cov(cov, torch.tensor([1.0, 1.0]), 0.5)
    assert got.dtype == torch.float64 and torch.allclose(
        got, torch.tensor([1 / 3.5, 1 / 5.5], dtype=torch.float64)
    )
    assert torch.equal(cov, torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64)))  # C kept
    with SameDevice():
        out = common.solve_cov(cov.to("meta"), torch.ones(2, 3), 0.5)
    assert out.is_meta and out.shape == (2, 3)
