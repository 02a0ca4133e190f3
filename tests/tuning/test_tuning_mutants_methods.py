"""Behaviour of full FT, BitFit, LP-FT, WiSE-FT (`lfm.tuning.methods`) and MeZO (`lfm.tuning.mezo`)
that `make mutate AREA=tuning` found untested.

- BitFit's fallback picks the parameters a normalisation module holds itself (also when the
  model is that module), not what a norm-named wrapper (`PreNorm`) wraps; its refusals name the
  model class and what to do.
- LP-FT's probe trains the head alone at `lp_lr` (not the fine-tuning lr, nor its `lr_groups`)
  and leaves `requires_grad` as it found it; the stages are recorded under the sub-runs `lp/`
  and `ft/`; the history's evaluations count steps from the start of the whole run; a resumed
  run says the step it resumed from; too few steps is one clear line.
- WiSE-FT interpolates floating tensors only (an integer buffer is copied), refuses state dicts
  with other keys naming them, trains a new head at `head_lr`, records the fine-tuning's
  evaluations and checkpoints in the run, and a finished run resumed gives the same result.
- MeZO's loop: quiet by default, the same steps for the same seed whatever the global RNG, a
  fresh direction each step, the loss at θ+εz as history, its progress bar and log lines; the
  label-word loss is the cross-entropy of the classifier it returns (left padding), with or
  without `logits_to_keep`; the response loss of instruction rows on the model's device; a
  task without label words is refused naming MeZO.
- The tuners' calls: `full_ft`, `bitfit`, `lp_ft` and `wise_ft` record their own name and config,
  evaluate `eval_data` and log into `run`, pass options (`inplace`) on, seed a new head with the
  call's seed (0 by default); LP-FT refuses other data and too few steps in one line each, and
  without `train_cfg` runs the loop's defaults (half probing at `lp_lr`) under the call's seed.
- MeZO's call is quiet by default (also with held-out data), shows the zero-shot and step bars
  and logs every `log_every` steps when asked, counts the tuned parameters only, names itself
  when the handle holds no model; the label loss moves the labels to the logits' device, and
  `perturb` draws z in each parameter's dtype and adds it on the parameter's device.

Equivalent survivors are listed, with reasons, in tests/mutation_equivalents.md.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lfm.access import Access, LocalModel
from lfm.core.runs import Run
from lfm.core.train import History, TrainConfig
from lfm.errors import AccessError, ConfigError
from lfm.registry import run
from lfm.tuning import methods
from lfm.tuning.classify import VerbalizerLM, ce_loss, class_batches, label_token_ids
from lfm.tuning.methods import (
    BitFitConfig,
    FullFTConfig,
    LPFTConfig,
    WiseFTConfig,
    all_trainable,
    bias_only,
    bitfit,
    full_ft,
    interpolate_weights,
    lp_ft,
    lp_ft_schedule,
    probe,
    wise_ft,
)
from lfm.tuning.mezo import (
    MeZOConfig,
    label_loss_fn,
    mezo,
    mezo_step,
    perturb,
    response_loss_fn,
    select,
    zero_order,
)
from lfm.tuning.sft import make_instructions
from lfm.tuning.tasks import Instructions, TextClassification
from lfm.tuning.tiny import WORDS, tiny_news_lm, tiny_task
from lfm.tuning.trainer import class_logits, snapshot

from conftest import make_lm


def _tcfg(steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, progress=False, cpu=True, **kw)


def _encoder() -> LocalModel:
    model, tok = make_lm("bert")
    return LocalModel(model, tok)


def _encoder_task() -> TextClassification:
    task = tiny_task()
    return TextClassification(task.texts, task.labels, n_classes=3)


def _metrics(path) -> dict:
    return json.loads((path / "manifest.json").read_text())["metrics"]


# -- BitFit --------------------------------------------------------------------------------------


class PreNorm(nn.Module):
    """A norm-named wrapper (as in many transformer codebases): a norm, then the wrapped layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.fn = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


def test_bitfit_fallback_trains_norm_gains_not_what_a_norm_named_wrapper_wraps():
    model = bias_only(nn.Sequential(PreNorm(4), nn.Linear(4, 2, bias=False)))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.norm.weight"]
    norm = bias_only(nn.RMSNorm(4))  # the model is itself the norm: its own gain trains
    assert norm.weight.requires_grad


def test_bitfit_refusals_name_the_model_and_what_to_do():
    llama = make_lm("llama")[0]
    want = (
        "LlamaForCausalLM has no bias parameters, so BitFit has nothing to train; "
        "set fallback='norms' to train the normalisation weights instead"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        bias_only(llama, BitFitConfig(fallback="error"))
    with pytest.raises(
        ConfigError, match=r"^Sequential has neither biases nor norm weights to train$"
    ):
        bias_only(nn.Sequential(nn.Linear(2, 2, bias=False)))


# -- LP-FT ---------------------------------------------------------------------------------------


def _head_classifier():
    from lfm.tuning.classify import HeadClassifier

    handle, task = _encoder(), _encoder_task()
    clf = all_trainable(HeadClassifier(handle.model, 3, seed=0))
    return clf, class_batches(handle.tokenizer, task.prompts(), task.labels, 6)


def test_lp_ft_probe_trains_only_the_head_at_lp_lr_then_restores_requires_grad():
    # AdamW's first step (no weight decay in the probe) moves each element with a gradient by its
    # lr: the head moves by lp_lr, not by the fine-tuning lr nor by the fine-tuning's lr_groups
    clf, batches = _head_classifier()
    head0, enc0 = snapshot(clf.head), snapshot(clf.encoder)
    cfg = LPFTConfig(lp_fraction=0.5, lp_lr=1e-2)
    tcfg = _tcfg(2, 1e-4, lr_groups={r"^head\.": 0.5})  # the fine-tuning stage's settings
    hist = probe(clf, ce_loss, batches, cfg, tcfg)
    assert len(hist.losses) == 1  # round(2 · 0.5) steps
    moved = max((v - head0[k]).abs().max().item() for k, v in clf.head.state_dict().items())
    assert moved == pytest.approx(1e-2, rel=1e-3)
    assert all(torch.equal(v, enc0[k]) for k, v in clf.encoder.state_dict().items())
    assert all(p.requires_grad for p in clf.parameters())  # as before the probe


def test_lp_ft_records_its_stages_and_counts_eval_steps_from_the_start(tmp_path):
    handle, task = tiny_news_lm(0), tiny_task()
    r = Run("lpft", root=tmp_path)
    cfg = LPFTConfig(lp_fraction=0.5, lr=1e-2)
    res = run("tuning/lp_ft", handle, task, cfg=cfg, train_cfg=_tcfg(4, 1e-2, eval_every=1),
              eval_data=task, run=r)  # fmt: skip
    assert len(res.history) == 4
    # the probe (steps 1-2) does not evaluate; the fine-tuning's steps 1-2 are the run's 3-4
    assert [sorted(e) for e in res.evals] == [["acc", "step"]] * 2
    assert [e["step"] for e in res.evals] == [3, 4]
    assert res.metrics["acc"] == res.evals[-1]["acc"]
    lp, ft = _metrics(r.path / "lp"), _metrics(r.path / "ft")
    assert lp["step"] == 2 and "loss" in lp
    assert ft["step"] == 2 and ft["acc"] == res.evals[-1]["acc"]


def test_lp_ft_schedule_refuses_fewer_than_two_steps_in_one_line():
    clf, batches = _head_classifier()
    want = "LP-FT needs at least 2 steps (one to probe, one to fine-tune)"
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        lp_ft_schedule(clf, ce_loss, batches, _tcfg(1, 1e-3), run=None, evaluate=None,
                       head_lr=None, metrics={}, cfg=LPFTConfig())  # fmt: skip


class Killed(Exception):
    """The process dying during training."""


def test_a_resumed_lp_ft_run_says_the_step_it_resumed_from(tmp_path):
    handle, task = tiny_news_lm(0), tiny_task()
    ids = label_token_ids(handle.tokenizer, WORDS)
    batches = class_batches(handle.tokenizer, task.prompts(), task.labels, 3)
    tcfg, cfg = _tcfg(4, 1e-2, ckpt_every=1), LPFTConfig(lp_fraction=0.5)
    calls = []

    def dies_at_step_4(model, batch):
        calls.append(1)
        if len(calls) == 4:  # the fine-tuning's second step: its first is checkpointed
            raise Killed
        return ce_loss(model, batch)

    def schedule(loss_fn):
        clf = VerbalizerLM(copy.deepcopy(handle.model), ids)
        r = Run("lpft", path=tmp_path / "run")
        return lp_ft_schedule(clf, loss_fn, batches, tcfg, run=r, evaluate=None, head_lr=None,
                              metrics={}, cfg=cfg)  # fmt: skip

    with pytest.raises(Killed):
        schedule(dies_at_step_4)
    resumed = schedule(ce_loss)  # the probe's 2 steps and 1 of the fine-tuning's were done
    assert resumed.start_step == 3 and len(resumed.losses) == 4
    assert len(calls) == 4  # the resumed run trained the last step only
    fresh = tmp_path / "fresh"
    whole = lp_ft_schedule(VerbalizerLM(copy.deepcopy(handle.model), ids), ce_loss, batches, tcfg,
                           run=Run("w", path=fresh), evaluate=None, head_lr=None, metrics={},
                           cfg=cfg)  # fmt: skip
    assert whole.start_step == 0
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-5)


# -- WiSE-FT -------------------------------------------------------------------------------------


def test_wise_ft_refuses_other_keys_naming_the_first_three_that_differ():
    t = torch.zeros(2)
    zero_shot = {k: t for k in "abcde"}
    tuned = {"a": t, "f": t}
    want = "WiSE-FT needs two state dicts with the same keys; they differ in ['b', 'c', 'd']"
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        interpolate_weights(zero_shot, tuned, 0.5)


def test_wise_ft_copies_an_integer_buffer_and_interpolates_floats():
    zero, one = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        one.weight.fill_(3.0)
    one.num_batches_tracked.fill_(7)
    tuned = one.state_dict()
    got = interpolate_weights(zero.state_dict(), tuned, 0.25)
    torch.testing.assert_close(got["weight"], torch.full((2,), 1.5))  # 0.75·1 + 0.25·3
    n = got["num_batches_tracked"]
    assert n.dtype == torch.long and int(n) == 7
    n.fill_(0)  # a copy: the tuned state is untouched
    assert int(tuned["num_batches_tracked"]) == 7


@pytest.mark.parametrize("head_lr", [0.1, None])
def test_wise_ft_trains_a_new_head_at_head_lr(head_lr):
    from lfm.tuning.classify import HeadClassifier

    start = HeadClassifier(make_lm("bert")[0], 3, seed=0).head.state_dict()
    cfg = WiseFTConfig(alpha=1.0)  # θ_1: the fine-tuned weights themselves
    res = run("tuning/wise_ft", _encoder(), _encoder_task(), cfg=cfg,
              train_cfg=_tcfg(1, 1e-4, weight_decay=0.0), head_lr=head_lr, batch_size=6)  # fmt: skip
    head = [(res.model.head.state_dict()[k] - v).abs().max().item() for k, v in start.items()]
    assert head == pytest.approx([head_lr or 1e-4] * 2, rel=1e-3)


def test_wise_ft_records_the_fine_tuning_and_a_finished_run_resumes_to_the_same_result(tmp_path):
    handle, task = tiny_news_lm(0), tiny_task()
    cfg = WiseFTConfig(alpha=0.5, alphas=(0.0, 1.0))
    tcfg = _tcfg(2, 1e-2, eval_every=1, ckpt_every=2)

    def once():
        r = Run("wise", path=tmp_path / "run", config={"x": 1})
        return run("tuning/wise_ft", handle, task, cfg=cfg, train_cfg=tcfg, eval_data=task, run=r)

    first = once()
    assert [e["step"] for e in first.evals] == [1, 2]  # the fine-tuning's evaluations
    assert first.metrics["fine_tuned_acc"] == first.evals[-1]["acc"]
    logged = _metrics(tmp_path / "run")
    assert logged["step"] == 2 and "loss" in logged  # the loop logged into the run
    assert (tmp_path / "run" / "checkpoint").is_dir()
    again = once()  # resumed from the last step: nothing left to train
    assert again.history == first.history and again.evals == []
    for k in ("fine_tuned_acc", "curve", "acc"):
        assert again.metrics[k] == first.metrics[k], k
    want = snapshot(first.backbone)
    assert all(torch.equal(v, want[k]) for k, v in snapshot(again.backbone).items())


# -- MeZO ----------------------------------------------------------------------------------------


def _quadratic() -> tuple[nn.Module, Callable[[], float], list]:
    """A linear layer and the loss ‖W − 1‖², recording each evaluation (value, flat W)."""
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.arange(9.0).reshape(3, 3) / 9)
    calls = []

    def loss() -> float:
        value = float(((model.weight - 1) ** 2).sum())
        calls.append((value, model.weight.detach().flatten().clone()))
        return value

    return model, loss, calls


def test_select_refuses_a_pattern_that_matches_nothing():
    with pytest.raises(ConfigError, match=r"^no parameter name matches 'nope'$"):
        select(nn.Linear(2, 2), "nope")


def test_zero_order_is_quiet_by_default_and_its_seed_alone_fixes_the_steps(capsys):
    cfg = MeZOConfig(steps=5, lr=1e-2, eps=1e-2)
    model, loss, _ = _quadratic()
    torch.manual_seed(123)
    default = zero_order(model, loss, cfg)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    model2, loss2, _ = _quadratic()
    torch.manual_seed(456)  # another global RNG state: the same steps
    seeded = zero_order(model2, loss2, cfg, seed=0)
    assert default == seeded and torch.equal(model.weight, model2.weight)
    model3, loss3, _ = _quadratic()
    assert zero_order(model3, loss3, cfg, seed=1) != seeded


def test_zero_order_history_is_the_loss_at_theta_plus_eps_z():
    model, loss, calls = _quadratic()
    hist = zero_order(model, loss, MeZOConfig(steps=4, lr=1e-2, eps=1e-2), seed=0)
    assert len(calls) == 8  # two evaluations a step: θ+εz, then θ−εz
    assert hist == [v for v, _ in calls[0::2]]


def test_zero_order_draws_a_fresh_direction_every_step():
    model, loss, calls = _quadratic()
    theta = model.weight.detach().flatten().clone()
    eps = 1e-2
    zero_order(model, loss, MeZOConfig(steps=70, lr=1e-12, eps=eps), seed=0)
    z = torch.stack([(w - theta) / eps for _, w in calls[0::2]])  # (steps, 9)
    dist = torch.cdist(z, z) + torch.eye(len(z)) * 1e9
    assert dist.min() > 0.1  # no two steps share z


def test_zero_order_shows_a_progress_bar_and_logs_every_n_steps(capsys):
    model, loss, _ = _quadratic()
    hist = zero_order(model, loss, MeZOConfig(steps=5, lr=1e-2, eps=1e-2), log_every=2,
                      progress=True)  # fmt: skip
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"mezo step {s}: loss {hist[s]:.4f}" for s in (0, 2, 4)]
    assert re.search(r"(^|\r)mezo: ", out.err) and re.search(r"loss=\d+\.\d{4}\b", out.err)


def test_mezo_label_loss_is_the_cross_entropy_of_the_classifier_it_returns():
    lm, task = tiny_news_lm(0), tiny_task()
    got = label_loss_fn(lm, task.texts, task.labels, task.verbalizer)()
    clf = VerbalizerLM(lm.model, label_token_ids(lm.tokenizer, WORDS))
    logits = class_logits(clf, lm.tokenizer, task)  # one left-padded batch of the six texts
    want = float(torch.nn.functional.cross_entropy(logits, task.labels))
    assert got == pytest.approx(want, abs=1e-5)


class KeepsLogits(nn.Module):
    """A causal LM whose forward takes `logits_to_keep` and nothing else beyond the batch."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, logits_to_keep=0):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=logits_to_keep)  # fmt: skip


class AllLogits(nn.Module):
    """A causal LM whose forward takes the batch only (no `logits_to_keep`)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask)


def test_mezo_label_loss_runs_on_models_with_and_without_logits_to_keep():
    lm, task = tiny_news_lm(0), tiny_task()
    args = (task.texts, task.labels, task.verbalizer)
    want = label_loss_fn(lm, *args)()
    for wrap in (KeepsLogits, AllLogits):
        got = label_loss_fn(LocalModel(wrap(lm.model), lm.tokenizer), *args)()
        assert got == pytest.approx(want, abs=1e-6), wrap.__name__


def test_mezo_tunes_on_instruction_rows_with_their_response_loss():
    lm, rows = tiny_news_lm(0), Instructions(make_instructions(4))
    cfg = MeZOConfig(steps=3, lr=1e-3)
    res = mezo(lm, rows, cfg, seed=0, eval_data=rows)
    # the loss tuned is the mean response NLL of the rows: the held-out evaluation's on them
    assert res.metrics["start_loss"] == pytest.approx(res.metrics["zero_shot_loss"], abs=1e-5)
    assert len(res.history) == 3 and res.verbalizer is None
    assert isinstance(res.model, type(lm.model))


class DeviceProbe(nn.Module):
    """A stand-in LM with its parameter on the meta device, noting where its inputs arrive."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, device="meta"))
        self.seen: list[str] = []

    def forward(self, input_ids, attention_mask, labels):
        self.seen += [t.device.type for t in (input_ids, attention_mask, labels)]
        return type("Out", (), {"loss": torch.tensor(0.5)})()


def test_mezo_response_loss_feeds_the_batch_on_the_models_device():
    model = DeviceProbe()
    loss = response_loss_fn(LocalModel(model, tiny_news_lm(0).tokenizer),
                             Instructions(make_instructions(2)))  # fmt: skip
    assert loss() == 0.5 and model.seen == ["meta"] * 3


def test_mezo_refuses_a_task_without_label_words_naming_itself():
    task = tiny_task()
    plain = TextClassification(task.texts, task.labels, n_classes=3)
    with pytest.raises(ConfigError, match=r"^MeZO classifies through label words"):
        mezo(tiny_news_lm(0), plain, MeZOConfig(steps=1))


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_mezo_step_is_the_papers_two_point_estimate_and_decoupled_decay(weight_decay):
    # MeZO (Malladi et al. 2023, algorithm 1) on L(θ) = Σ θ³ (curved: ĝ is not the exact
    # directional derivative): ĝ = (L(θ+εz) − L(θ−εz)) / 2ε, then θ ← θ(1 − ηλ) − η·ĝ·z
    theta = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([[1.5, 0.25]])]
    params = [t.clone() for t in theta]
    cfg = MeZOConfig(lr=0.1, eps=0.2, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(11)
    z = [torch.randn(t.shape, generator=g) for t in theta]  # `perturb`'s draw, in order

    def loss_at(ps) -> float:
        return float(sum((p.double() ** 3).sum() for p in ps))

    plus_want = loss_at([t + cfg.eps * d for t, d in zip(theta, z, strict=True)])
    minus_want = loss_at([t - cfg.eps * d for t, d in zip(theta, z, strict=True)])
    grad_want = (plus_want - minus_want) / (2 * cfg.eps)
    plus, grad = mezo_step(params, lambda: loss_at(params), 11, cfg)
    assert plus == pytest.approx(plus_want, rel=1e-5)
    assert grad == pytest.approx(grad_want, rel=1e-5)
    for p, t, d in zip(params, theta, z, strict=True):
        want = t * (1 - cfg.lr * weight_decay) - cfg.lr * grad_want * d
        torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-5)


def test_mezo_returns_its_name_tokenizer_verbaliser_and_steps_under_its_seed():
    task, cfg = tiny_task(), MeZOConfig(steps=3, lr=1e-2, params=r"layers\.1\.")
    lm = tiny_news_lm(0)
    res = mezo(lm, task, cfg, eval_data=task)
    assert res.method == "mezo" and res.config is cfg and res.tokenizer is lm.tokenizer
    assert res.verbalizer == task.verbalizer and "zero_shot_acc" in res.metrics
    # the steps are `zero_order`'s under the call's seed (0 by default; another seed differs)
    for seed in (0, 5):
        again = tiny_news_lm(0)
        loss = label_loss_fn(again, task.texts, task.labels, task.verbalizer)
        want = zero_order(again.model, loss, cfg, seed=seed)
        got = res if seed == 0 else mezo(tiny_news_lm(0), task, cfg, seed=seed)
        assert got.history == pytest.approx(want, rel=1e-6)
    assert mezo(tiny_news_lm(0), task, cfg, seed=5).history != res.history
    # in place, the handle's own model is the one tuned; by default a copy is
    assert mezo(lm, task, cfg, inplace=True).backbone is lm.model
    assert res.backbone is not lm.model
    enc = LocalModel(*make_lm("bert"))
    with pytest.raises(ConfigError, match=r"^MeZO here tunes a causal LM .*, not an encoder$"):
        mezo(enc, task, cfg)
    with pytest.raises(ConfigError, match=r"^tuning/mezo learns from a TextClassification or "
                       r"Instructions, not a list$"):  # fmt: skip
        mezo(lm, ["a text"], cfg)


# -- the tuners' calls: name, config, seed, held-out data, run and options passed on -------------

_TUNERS = {"full_ft": full_ft, "bitfit": bitfit, "lp_ft": lp_ft, "wise_ft": wise_ft}
_CONFIGS = {
    "full_ft": FullFTConfig(lr=1e-2),
    "bitfit": BitFitConfig(lr=1e-2),
    "lp_ft": LPFTConfig(lr=1e-2),
    "wise_ft": WiseFTConfig(lr=1e-2, alphas=(0.0, 1.0)),
}


@pytest.mark.parametrize("name", list(_TUNERS))
def test_weight_tuners_record_their_name_config_evaluation_and_run_and_pass_options_on(
    name, tmp_path
):
    handle, task, cfg = tiny_news_lm(0), tiny_task(), _CONFIGS[name]
    r = Run(name, root=tmp_path)
    res = _TUNERS[name](handle, task, cfg, train_cfg=_tcfg(2, 1e-2), eval_data=task, run=r,
                        inplace=True)  # fmt: skip
    assert res.method == name and res.config is cfg
    assert res.backbone is handle.model  # `inplace` reached the trainer
    assert {"zero_shot_acc", "acc"} <= set(res.metrics)  # the held-out data was evaluated
    logged = _metrics(r.path)  # ... and recorded in the run
    assert logged["acc"] == res.metrics["acc"]
    assert logged["trainable_parameters"] == res.metrics["trainable_parameters"]


@pytest.mark.parametrize("name", list(_TUNERS))
def test_weight_tuners_seed_a_new_head_and_default_to_seed_0(name):
    def once(**kw):
        res = _TUNERS[name](_encoder(), _encoder_task(), _CONFIGS[name],
                            train_cfg=_tcfg(2, 1e-3), **kw)  # fmt: skip
        return res.history, snapshot(res.model.head)

    def same(a, b) -> bool:
        return a[0] == b[0] and all(torch.equal(v, b[1][k]) for k, v in a[1].items())

    default, zero, three = once(), once(seed=0), once(seed=3)
    assert same(default, zero)  # the default seed is 0
    assert not same(zero, three)  # the call's seed reaches the new head's initial values


def test_lp_ft_refuses_other_data_and_too_few_steps_in_one_line():
    lm = tiny_news_lm(0)
    with pytest.raises(
        ConfigError, match=r"^LP-FT probes a classification head; it takes a TextClassification$"
    ):
        lp_ft(lm, Instructions(make_instructions(2)), train_cfg=_tcfg(4, 1e-2))
    want = "LP-FT needs at least 2 steps (one to probe, one to fine-tune)"
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        lp_ft(lm, tiny_task(), train_cfg=_tcfg(1, 1e-2))


def test_lp_ft_without_train_cfg_runs_the_loops_defaults_under_the_calls_seed(monkeypatch):
    # no train_cfg: the loop's default 100 steps, half probing at lp_lr, then the rest at `lr`,
    # both seeded by the call's seed (the loop itself is replaced: only its settings are looked at)
    seen = []

    def fake_train(model, loss_fn, batches, tcfg, run=None, evaluate=None):
        seen.append((tcfg.steps, tcfg.lr, tcfg.seed))
        return History([0.0] * tcfg.steps)

    monkeypatch.setattr(methods, "train", fake_train)
    cfg = LPFTConfig(lp_lr=0.5, lr=0.25)
    res = lp_ft(tiny_news_lm(0), tiny_task(), cfg, seed=3)
    assert seen == [(50, 0.5, 3), (50, 0.25, 3)]
    assert len(res.history) == 100


# -- MeZO's call: what it shows, prints and records ----------------------------------------------


def test_mezo_is_quiet_by_default_also_with_held_out_data(capsys):
    lm, task = tiny_news_lm(0), tiny_task()
    res = mezo(lm, task, MeZOConfig(steps=2, lr=1e-2), eval_data=task)
    assert "zero_shot_acc" in res.metrics and "acc" in res.metrics
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_mezo_shows_the_zero_shot_and_step_bars_and_logs_every_n_steps(capsys):
    lm, task = tiny_news_lm(0), tiny_task()
    res = mezo(lm, task, MeZOConfig(steps=3, lr=1e-2), eval_data=task, log_every=2,
               progress=True)  # fmt: skip
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"mezo step {s}: loss {res.history[s]:.4f}" for s in (0, 2)]
    assert re.search(r"(^|\r)zero-shot: ", out.err)  # the evaluation before tuning
    assert re.search(r"(^|\r)mezo: ", out.err)  # the steps


def test_mezo_counts_the_tuned_parameters_only():
    lm, task = tiny_news_lm(0), tiny_task()
    want = sum(p.numel() for n, p in lm.model.named_parameters() if re.search(r"layers\.1\.", n))
    res = mezo(lm, task, MeZOConfig(steps=1, params=r"layers\.1\."))
    assert res.metrics["trainable_parameters"] == want
    assert want < sum(p.numel() for p in lm.model.parameters())


class NoModel:
    """A handle that declares WEIGHTS access but holds no model in memory."""

    access = Access.WEIGHTS
    model = None
    tokenizer = None
    name = "nothing"


def test_mezo_names_itself_when_the_handle_holds_no_model():
    with pytest.raises(AccessError, match=r"^tuning/mezo needs a model in memory, not NoModel$"):
        mezo(NoModel(), tiny_task(), MeZOConfig(steps=1))


class MetaLM(nn.Module):
    """A stand-in causal LM whose weights (and so its logits) live on the meta device."""

    def __init__(self, vocab: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, device="meta"))
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab, device="meta")
        return type("Out", (), {"logits": logits})()


def test_mezo_label_loss_takes_the_labels_to_the_logits_device(monkeypatch):
    lm, task = tiny_news_lm(0), tiny_task()
    seen = []

    def cross_entropy(logits, target):
        seen.append((logits.device.type, target.device.type))
        return torch.tensor(0.25)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    local = LocalModel(MetaLM(len(lm.tokenizer)), lm.tokenizer)
    loss = label_loss_fn(local, task.texts, task.labels, task.verbalizer)
    assert loss() == 0.25 and seen == [("meta", "meta")]


class Adds(TorchFunctionMode):
    """Notes the devices of each in-place addition's two operands."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.add_:
            self.seen.append((args[0].device.type, args[1].device.type))
        return func(*args, **(kwargs or {}))


def test_perturb_draws_z_in_each_parameters_dtype_and_adds_it_on_its_device():
    # float64 parameters get a float64 draw (another stream than float32's), in order
    params = [torch.zeros(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    perturb(params, 7, 0.5)
    g = torch.Generator().manual_seed(7)
    want = [torch.randn(3, generator=g, dtype=torch.float64) * 0.5,
            1 + torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.5]  # fmt: skip
    for p, w in zip(params, want, strict=True):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, w, rtol=0, atol=1e-12)
    # z is drawn on the CPU and moved to the parameter's device before the addition
    meta = [torch.zeros(3, device="meta")]
    with Adds() as adds:
        perturb(meta, 7, 0.5)
    assert adds.seen == [("meta", "meta")]
