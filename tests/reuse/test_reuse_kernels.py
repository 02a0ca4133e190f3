"""Parity of the merge kernels with hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lfm import registry
from lfm.config import Config
from lfm.errors import ConfigError
from lfm.registry import methods, run
from lfm.reuse import kernels as K
from lfm.reuse import merge_state_dicts
from lfm.reuse.driver import Ctx, MergeError
from lfm.reuse.methods import LinearConfig, SlerpConfig, TiesConfig
from lfm.reuse.topk import model_threshold

BASE = torch.ones(4)
TAUS = [
    torch.tensor([1.0, -2.0, 0.5, 3.0]),
    torch.tensor([-1.5, 1.0, 0.1, 2.0]),
    torch.tensor([0.2, -3.0, -1.0, -0.5]),
]


def _sds(taus, base=BASE):
    return {"x": base}, [{"x": base + t} for t in taus]


def test_ties_by_hand():
    # density 0.5 keeps 2 of 4 per vector: [0,-2,0,3], [-1.5,0,0,2], [0,-3,-1,0]
    # elected signs of the sum [-1.5,-5,-1,5]: [-,-,-,+]; disjoint means: -1.5, -2.5, -1, 2.5
    base, sds = _sds(TAUS)
    out = merge_state_dicts("ties", base, sds, {"density": 0.5})["x"]
    torch.testing.assert_close(out, BASE + torch.tensor([-1.5, -2.5, -1.0, 2.5]))


def test_ties_scale_and_sum():
    base, sds = _sds(TAUS)
    out = merge_state_dicts("ties", base, sds, {"density": 0.5, "scale": 0.5, "normalize": False})
    torch.testing.assert_close(out["x"], BASE + 0.5 * torch.tensor([-1.5, -5.0, -1.0, 5.0]))


def test_ties_model_scope_uses_one_threshold_over_all_tensors():
    # over both tensors of model 0, |τ| = [4,3,2,1] and [0.5,0.25]: density 0.5 keeps 4,3,2
    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    sd = {"a": torch.tensor([4.0, -3.0, 2.0, 1.0]), "b": torch.tensor([0.5, -0.25])}
    cfg = {"density": 0.5, "trim_scope": "model"}
    out = merge_state_dicts("ties", base, [sd], cfg)
    torch.testing.assert_close(out["a"], torch.tensor([4.0, -3.0, 2.0, 0.0]))
    torch.testing.assert_close(out["b"], torch.zeros(2))
    per_tensor = merge_state_dicts("ties", base, [sd], {"density": 0.5})
    torch.testing.assert_close(per_tensor["b"], torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("density", [0.013, 0.2, 0.5, 0.97])
def test_model_threshold_is_exact(density):
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=gen).abs() ** 3 for n in (1000, 37, 5000)]
    parts[1][:5] = 0.0
    whole = torch.cat(parts)
    k = K.keep_count(whole.numel(), density)
    assert model_threshold(lambda: iter(parts), density) == pytest.approx(
        K.kth_largest(whole, k), rel=0
    )


def test_task_arithmetic_by_hand():
    base, sds = _sds(TAUS[:2])
    out = merge_state_dicts("task_arithmetic", base, sds, {"scale": 0.5}, weights=[1.0, 2.0])
    torch.testing.assert_close(out["x"], BASE + 0.5 * (TAUS[0] + 2 * TAUS[1]))


def test_linear_weights_and_normalize():
    sds = [{"x": torch.tensor([0.0])}, {"x": torch.tensor([4.0])}]
    assert merge_state_dicts("linear", None, sds, weights=[1, 3])["x"].item() == 3.0
    raw = merge_state_dicts("linear", None, sds, {"normalize": False}, weights=[1, 3])
    assert raw["x"].item() == 12.0


def test_dare_rescales_exactly_and_is_seeded():
    tau = torch.ones(2000)
    out = K.dare(tau, 0.75, seed=K.tensor_seed(0, "x", 0))
    kept = out[out != 0]
    assert torch.all(kept == 4.0)  # exactly 1 / (1 - 0.75)
    assert 0.2 < kept.numel() / 2000 < 0.3
    assert torch.equal(out, K.dare(tau, 0.75, seed=K.tensor_seed(0, "x", 0)))
    assert not torch.equal(out, K.dare(tau, 0.75, seed=K.tensor_seed(0, "y", 0)))
    assert K.tensor_seed(0, "x", 0) != K.tensor_seed(0, "x", 1)


def test_dare_linear_through_driver_is_reproducible():
    base, sds = _sds([torch.full((4,), 2.0)] * 2)
    cfg = {"drop_rate": 0.5, "seed": 3}
    a = merge_state_dicts("dare_linear", base, sds, cfg)["x"]
    assert torch.equal(a, merge_state_dicts("dare_linear", base, sds, cfg)["x"])
    assert set((a - BASE).tolist()) <= {0.0, 4.0, 8.0}  # each kept 2.0 becomes exactly 4.0


def test_dare_ties_without_drop_is_ties_at_full_density():
    base, sds = _sds(TAUS)
    a = merge_state_dicts("dare_ties", base, sds, {"drop_rate": 0.0})["x"]
    b = merge_state_dicts("ties", base, sds, {"density": 1.0})["x"]
    torch.testing.assert_close(a, b)


def test_slerp_endpoints_orthogonal_and_parallel_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(K.slerp(a, b, 0.0), a)
    torch.testing.assert_close(K.slerp(a, b, 1.0), b)
    h = math.sqrt(0.5)
    torch.testing.assert_close(K.slerp(a, b, 0.5), torch.tensor([h, h]))
    c = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(K.slerp(c, 2 * c, 0.25), torch.lerp(c, 2 * c, 0.25))
    out = merge_state_dicts("slerp", None, [{"x": a}, {"x": b}], {"t": 0.5})["x"]
    torch.testing.assert_close(out, torch.tensor([h, h]))


def test_model_stock_ratio_and_kernel():
    assert K.model_stock_ratio(0.5, 2) == pytest.approx(2 / 3)
    assert K.model_stock_ratio(0.2, 5) == pytest.approx(1.0 / 1.8)
    assert K.model_stock_ratio(-0.3, 3) == 0.0
    base = {"x": torch.zeros(2)}
    sds = [{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([1.0, 1.0])}]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = merge_state_dicts("model_stock", base, sds)["x"]
    torch.testing.assert_close(out, t * torch.tensor([1.0, 0.5]))


def test_dtype_is_kept_and_ints_are_copied():
    base = {"x": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor([7])}
    sds = [{"x": torch.full((3,), 2.0, dtype=torch.bfloat16), "n": torch.tensor([9])}]
    out = merge_state_dicts("task_arithmetic", base, sds)
    assert out["x"].dtype == torch.bfloat16 and out["n"].item() == 7


def test_arity_and_unknown_method_errors():
    base, sds = _sds(TAUS)
    with pytest.raises(MergeError, match="needs a base model"):
        merge_state_dicts("ties", None, sds)
    with pytest.raises(MergeError, match="2 to 2"):
        merge_state_dicts("slerp", None, sds)
    with pytest.raises(MergeError, match="no merge method"):
        merge_state_dicts("nope", base, sds)
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts("ties", base, sds, {"density": 2})


def _tensors(result) -> list[torch.Tensor]:
    """Every tensor of a result: a state dict, a list of them, labels or log-probabilities."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [v for k in sorted(result) for v in _tensors(result[k])]
    return [v for r in result for v in _tensors(r)]


def _run_example(spec, seed):
    ex = spec.example(spec.access, seed)
    return _tensors(ex.summary(run(spec.key, *ex.args, cfg=ex.cfg, **ex.kwargs)))


@pytest.mark.parametrize("spec", methods("reuse"), ids=lambda s: s.name)
def test_every_method_runs_by_name_deterministically_and_depends_on_its_inputs(spec):
    cfg = spec.config.build()
    assert isinstance(cfg, Config)
    assert spec.config.build(__import__("json").loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError):
        spec.config.build({"no_such_knob": 1})
    a, b = _run_example(spec, 0), _run_example(spec, 0)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other = _run_example(spec, 1)
    assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))


def test_kernels_run_by_name_over_handles_equal_the_state_dict_merge():
    from lfm.access import LocalClassifier
    from lfm.core.tiny import tiny_mlp

    models = [tiny_mlp(seed=s) for s in range(3)]
    sds = [m.state_dict() for m in models]
    got = run("reuse/ties", [LocalClassifier(models[1]), models[2]], base=sds[0],
              weights=[1.0, 2.0], cfg={"density": 0.5})  # fmt: skip
    want = merge_state_dicts("ties", sds[0], sds[1:], {"density": 0.5}, weights=[1.0, 2.0])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert registry.get("reuse/ties").fn(BASE, [BASE + t for t in TAUS], [1.0] * 3,
                                          TiesConfig(density=0.5), Ctx("x")).shape == (4,)  # fmt: skip

    class MyTies(TiesConfig):  # a user's subclass is still TIES's config
        pass

    sub = run("reuse", "ties", [sds[1], sds[2]], base=sds[0], weights=[1.0, 2.0],
              cfg=MyTies(density=0.5))  # fmt: skip
    assert all(torch.equal(sub[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="takes a TiesConfig, not a SlerpConfig"):
        run("reuse/ties", sds[1:], base=sds[0], cfg=SlerpConfig())


def test_the_driver_reads_arity_and_prepare_from_the_registry():
    extras = {s.name: s.extras for s in methods("reuse") if s.shape.name == "kernel"}
    assert extras["slerp"] == {"needs_base": False, "min_models": 2, "max_models": 2}
    linear = dict(extras["linear"])
    divides = linear.pop("divides_by_weight_sum")  # weights summing to zero are refused
    assert linear == {"needs_base": False}
    assert divides(LinearConfig()) and not divides(LinearConfig(normalize=False))
    assert callable(extras["ties"]["prepare"]) and callable(extras["fisher"]["prepare"])
    with pytest.raises(MergeError, match="no merge method 'ensemble_vote'"):
        merge_state_dicts("ensemble_vote", None, [{"x": BASE}])


def _reference_kth(arr: np.ndarray, k: int) -> float:
    return float(np.partition(arr, arr.size - k)[arr.size - k])


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "float64"])
def test_kth_largest_of_a_large_tensor_is_exact_at_every_rank(kind):
    rng = np.random.default_rng(0)
    n = K.BOUNDED_OVER + 3
    arr = np.abs(rng.standard_normal(n)).astype(np.float32)
    if kind == "ties":  # a few hundred distinct values, each repeated thousands of times
        arr = np.round(arr * 100) / 100
    elif kind == "zeros":  # most of the tensor untouched by fine-tuning
        arr[: n * 3 // 4] = 0.0
    elif kind == "float64":
        arr = arr.astype(np.float64) * 1e-3
    ranks = [1, 2, 17, n // 100, round(0.2 * n), n // 2, n - 5, n]
    for k in ranks:
        want = _reference_kth(arr, k)
        assert K.kth_largest(torch.from_numpy(arr.copy()), k) == want, k
        assert K.kth_largest(torch.from_numpy(arr.copy()), k, overwrite=True) == want, k
    # the bounded selection answers (not the fallback) at TIES's density and at the median
    found = [K.bounded_kth(arr, round(d * n)) for d in (0.2, 0.5)]
    assert found == [_reference_kth(arr, round(d * n)) for d in (0.2, 0.5)]


def test_kth_largest_falls_back_where_the_sample_misleads_or_nans_hide():
    n = K.BOUNDED_OVER + 1
    stride = K.SAMPLE_EVERY
    arr = np.ones(n, dtype=np.float32)
    arr[::stride] = 0.0  # every sampled entry is 0, the others 1: the bounds miss
    k = round(0.2 * n)
    assert K.bounded_kth(arr, k) is None
    assert K.kth_largest(torch.from_numpy(arr), k) == 1.0
    rng = np.random.default_rng(1)
    arr = np.abs(rng.standard_normal(n)).astype(np.float32)
    arr[1] = np.nan  # not sampled: only the counts can see it
    assert K.bounded_kth(arr, k) is None
    assert math.isnan(K.kth_largest(torch.from_numpy(arr), 1))  # as partition: NaN is the largest
    assert K.kth_largest(torch.from_numpy(arr), k) == _reference_kth(arr, k)


@pytest.fixture
def small_chunks(monkeypatch):
    """Tensors of more than 500 entries go chunk by chunk, 97 entries a chunk (uneven ends)."""
    monkeypatch.setattr(K, "CHUNKED_OVER", 500)
    monkeypatch.setattr(K, "CHUNK", 97)


def _family(seed: int, shape=(40, 31)):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + torch.randn(shape, generator=gen) * s for s in (0.1, 0.2, 0.05)]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_a_large_tensor_merged_chunk_by_chunk_gives_the_same_floats(method, monkeypatch):
    """The chunked way (thresholds from chunks, each model's DARE mask drawn on from one stream)
    gives the whole-tensor way's floats, bit for bit; a mask drawn afresh per chunk would not."""
    base, tensors = _family(3)
    spec = registry.get(f"reuse/{method}")
    cfg = spec.config.build({"density": 0.3} if method == "ties" else {"drop_rate": 0.5})
    ctx = Ctx("model.embed_tokens.weight", {}, (0, 1, 2))
    assert not K.chunked(base)
    whole = spec.fn(base, tensors, [1.0, 0.5, 2.0], cfg, ctx)
    calls = []
    by_chunks = K.by_chunks
    monkeypatch.setattr(K, "by_chunks", lambda *a: calls.append(1) or by_chunks(*a))
    monkeypatch.setattr(K, "CHUNKED_OVER", 500)
    monkeypatch.setattr(K, "CHUNK", 97)
    assert K.chunked(base)
    chunked = spec.fn(base, tensors, [1.0, 0.5, 2.0], cfg, ctx)
    assert calls == [1] and chunked.dtype == torch.float32 and chunked.shape == base.shape
    assert torch.equal(chunked, whole)
    assert not torch.equal(whole, base)


def test_difference_threshold_from_chunks_is_exact_and_falls_back(small_chunks, monkeypatch):
    base, tensors = _family(4)
    for x in tensors:
        for density in (0.01, 0.2, 0.5, 1.0):
            want = K.magnitude_threshold(x - base, density)
            assert K.difference_threshold(x, base, density) == want, density
    assert K.difference_threshold(tensors[0], base, 0.0) == math.inf
    # the chunks answer, not the whole-tensor fallback, on ordinary task vectors
    monkeypatch.setattr(K, "magnitude_threshold", lambda *a: pytest.fail("fell back"))
    assert K.difference_threshold(tensors[1], base, 0.2) > 0
    monkeypatch.undo()  # undoes the fixture's too
    monkeypatch.setattr(K, "CHUNKED_OVER", 500)
    monkeypatch.setattr(K, "CHUNK", 97)
    # a NaN the sample misses is seen by the counts: the fallback answers, as partition does
    x = tensors[2].clone()
    x.view(-1)[1] = float("nan")
    assert K.chunked(x) and math.isnan(K.difference_threshold(x, base, 1 / x.numel()))
    # half precision inputs: the task vector is taken in float32, as `task_vectors` does
    xb, bb = tensors[0].to(torch.bfloat16), base.to(torch.bfloat16)
    want = K.magnitude_threshold(xb.float() - bb.float(), 0.2)
    assert K.difference_threshold(xb, bb, 0.2) == want
