"""Fisher merging and AdaMerging: statistics files, the merge through the driver and the engine."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from lfm.reuse import merge_models, merge_state_dicts
from lfm.reuse.adamerging import AdaMergingConfig, learn_coefficients, save_coefficients
from lfm.reuse.datamerge import fisher_merge
from lfm.reuse.stats import FORMAT, fisher, save_fisher, save_gram, stats_meta


def _sds(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(4, 6, generator=gen), "b": torch.randn(4, generator=gen)}
        for _ in range(2)
    ]


def test_disjoint_fisher_support_picks_each_models_weights():
    a, b = _sds()
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    fa = {"w": mask.float(), "b": torch.ones(4)}
    fb = {"w": (~mask).float(), "b": torch.zeros(4)}
    out = merge_state_dicts("fisher", None, [a, b], {"eps": 1e-12}, stats={"per_model": [fa, fb]})
    torch.testing.assert_close(out["w"], torch.where(mask, a["w"], b["w"]))
    torch.testing.assert_close(out["b"], a["b"])


def test_fisher_merge_by_hand_and_zero_fisher_is_an_average():
    ts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    fs = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    got = fisher_merge(ts, fs, [1.0, 1.0], eps=1e-6)
    torch.testing.assert_close(got, torch.tensor([(1 + 9) / 4, 4.0]))


def test_fisher_estimates_are_squared_gradients():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    got, n = fisher(model, [(x, y)], kind="label")
    want = torch.zeros_like(model.weight)
    for i in range(5):
        model.zero_grad()
        model(x[i : i + 1]).log_softmax(-1)[0, y[i]].backward()
        want += model.weight.grad**2 / 5
    assert n == 5
    torch.testing.assert_close(got["weight"], want)
    exact, _ = fisher(model, [x], kind="exact")
    sampled, _ = fisher(model, [x], kind="sample", seed=3)
    assert exact["weight"].shape == sampled["weight"].shape and exact["weight"].sum() > 0


def test_fisher_files_stream_through_the_engine(tmp_path):
    torch.manual_seed(0)
    models = [nn.Linear(3, 2) for _ in range(2)]
    x = torch.randn(8, 3)
    paths, stats = [], []
    for i, m in enumerate(models):
        save_file(dict(m.state_dict()), str(tmp_path / f"m{i}.safetensors"))
        paths.append(str(save_fisher(tmp_path / f"f{i}.safetensors", m, [x])))
        stats.append(fisher(m, [x])[0])
    assert stats_meta(paths[0]) == {
        "format": FORMAT, "kind": "fisher", "count": 8, "estimator": "sample"
    }  # fmt: skip
    out = merge_models("fisher", [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
                       tmp_path / "out", cfg={"stats": paths}, progress=False)  # fmt: skip
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    want = merge_state_dicts("fisher", None, [m.state_dict() for m in models],
                             stats={"per_model": stats})  # fmt: skip
    torch.testing.assert_close(got["weight"], want["weight"])


def _adamerging_problem():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sds = [
        {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(2)
    ]
    data = [[torch.randn(16, 6, generator=gen) for _ in range(2)] for _ in range(2)]
    return model, base, sds, data


def test_adamerging_lowers_entropy_and_moves_its_coefficients(tmp_path):
    model, base, sds, data = _adamerging_problem()
    cfg = AdaMergingConfig(steps=40, lr=0.05)
    coef, hist = learn_coefficients(model, base, sds, data, cfg)
    assert hist[-1] < hist[0] - 1e-3
    moved = torch.stack(list(coef.values()))
    assert (moved - 0.3).abs().max() > 0.01 and moved.min() >= 0 and moved.max() <= 1
    # the merge reads the learned coefficients from a file and equals θ_b + Σ λ τ
    path = save_coefficients(tmp_path / "coef.safetensors", coef)
    out = merge_state_dicts("adamerging", base, sds, {"coefficients": str(path)})
    lam = coef["0.weight"]
    want = base["0.weight"] + sum(
        lam[k] * (sds[k]["0.weight"] - base["0.weight"]) for k in range(2)
    )
    torch.testing.assert_close(out["0.weight"], want)


def test_adamerging_task_wise_shares_one_coefficient_per_task():
    model, base, sds, data = _adamerging_problem()
    coef, _ = learn_coefficients(
        model, base, sds, data, AdaMergingConfig(steps=5, lr=0.05, granularity="task")
    )
    first = next(iter(coef.values()))
    assert all(torch.equal(v, first) for v in coef.values()) and not torch.allclose(
        first, torch.full((2,), 0.3)
    )


def test_missing_or_miscounted_statistics_are_clear_errors(tmp_path):
    import pytest

    from lfm.errors import LfmError
    from lfm.reuse import MergeError

    a, b = _sds()
    with pytest.raises(MergeError, match="needs statistics"):
        merge_state_dicts("fisher", None, [a, b])
    path = save_fisher(tmp_path / "f.safetensors", nn.Linear(6, 4), [torch.randn(3, 6)])
    with pytest.raises(MergeError, match="1 statistics files for 2 models"):
        merge_state_dicts("regmean", None, [a, b], {"stats": [str(path)]})
    # a Fisher file is not a Gram file, nor a weights file a statistics file
    with pytest.raises(LfmError, match="holds fisher statistics, not gram"):
        merge_state_dicts("regmean", None, [a, b], {"stats": [str(path)] * 2})
    save_file(a, str(tmp_path / "w.safetensors"))
    with pytest.raises(LfmError, match=r"is not a lfm\.reuse\.stats/1 file"):
        merge_state_dicts("fisher", None, [a, b], {"stats": [str(tmp_path / "w.safetensors")] * 2})
    gram = save_gram(tmp_path / "g.safetensors", nn.Linear(6, 4), [torch.randn(3, 6)])
    with pytest.raises(LfmError, match="holds gram statistics, not AdaMerging"):
        merge_state_dicts("adamerging", a, [a, b], {"coefficients": str(gram)})
