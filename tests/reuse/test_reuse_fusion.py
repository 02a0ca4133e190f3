"""The FusionBench-style table on a tiny conv backbone with two synthetic tasks."""

from __future__ import annotations

import torch
from torch import nn

from lfm.reuse import merge_state_dicts
from lfm.reuse.fusion import FusionConfig, FusionTask, accuracy, fusion_table, score


def _backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip


def _task(k: int, gen: torch.Generator) -> FusionTask:
    x = torch.randn(48, 1, 6, 6, generator=gen)
    y = (x[:, 0, k, :].sum(-1) > 0).long()  # label from row k: tasks differ
    head = nn.Linear(4, 2)
    return FusionTask(f"t{k}", head, (x[:16], y[:16]), (x[16:], y[16:]), x[:8], nn.Linear(4, 2))


def _setup(identical: bool):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bb = _backbone()
    base = {k: v.clone() for k, v in bb.state_dict().items()}
    tasks = [_task(k, gen) for k in range(2)]
    experts = []
    for k in range(2):
        noise = torch.Generator().manual_seed(0 if identical else k + 1)
        experts.append({n: v + 0.3 * torch.randn(v.shape, generator=noise) if v.is_floating_point() else v
                        for n, v in base.items()})  # fmt: skip
    return bb, base, experts, tasks


def test_fusion_table_rows_match_direct_evaluation(tmp_path):
    bb, base, experts, tasks = _setup(identical=False)
    cfg = FusionConfig(ada_steps=2, ada_batch=8, lambdas=(0.5, 1.0), spectral_scales=(0.5, 2.0))
    res = fusion_table(bb, base, experts, tasks, tmp_path, cfg, log=lambda _: None)
    assert list(res.rows) == [
        "pretrained", "individual", "average", "task arithmetic", "TIES", "DARE-TIES",
        "Breadcrumbs", "DELLA", "TSV-Merge", "Iso-C", "Iso-CTS", "Fisher", "RegMean",
        "AdaMerging (task-wise)", "AdaMerging (layer-wise)",
        "ensemble: prob. average", "ensemble: majority vote",
    ]  # fmt: skip
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in res.rows.values())
    assert res.rows["individual"] == [
        accuracy(bb, sd, t.head, t.test) for sd, t in zip(experts, tasks, strict=True)
    ]
    assert res.rows["pretrained"] == [accuracy(bb, base, t.probe_head, t.test) for t in tasks]
    assert res.rows["average"] == score(bb, merge_state_dicts("linear", None, experts), tasks)
    lam = res.notes["ties_scale"]
    assert lam in (0.5, 1.0)
    ties = merge_state_dicts("ties", base, experts, {"density": 0.2, "scale": lam})
    assert res.rows["TIES"] == score(bb, ties, tasks)
    alpha = res.notes["iso_c_scale"]
    iso = merge_state_dicts("iso_c", base, experts, {"scale": alpha})
    assert alpha in (0.5, 2.0) and res.rows["Iso-C"] == score(bb, iso, tasks)
    assert (tmp_path / "gram1.safetensors").exists() and (tmp_path / "fisher0.safetensors").exists()
    assert "| RegMean |" in res.markdown() and res.markdown().count("\n") == len(res.rows) + 1


def test_merging_identical_experts_gives_the_expert_back(tmp_path):
    bb, base, experts, tasks = _setup(identical=True)
    cfg = FusionConfig(ada_steps=0, ensembles=False, lambdas=(0.5,), spectral_scales=(1.0,))
    res = fusion_table(bb, base, experts, tasks, tmp_path, cfg, log=lambda _: None)
    for label in ("average", "Fisher", "RegMean"):
        assert res.rows[label] == res.rows["individual"], label
    assert res.rows["task arithmetic"] == score(bb, experts[0], tasks)  # θ_b + 0.5 · 2τ = θ_1


def test_adamerging_learns_no_coefficients_for_batchnorm_buffers():
    from lfm.reuse.adamerging import AdaMergingConfig, learn_coefficients

    torch.manual_seed(3)
    bb = _backbone()
    base = {k: v.clone() for k, v in bb.state_dict().items()}
    experts = [{k: v + 0.1 * torch.rand(v.shape) if v.is_floating_point() else v
                for k, v in base.items()} for _ in range(2)]  # fmt: skip
    data = [[torch.randn(4, 1, 6, 6)] for _ in range(2)]
    cfg = AdaMergingConfig(steps=3, lr=0.05)
    coef, hist = learn_coefficients(bb, base, experts, data, cfg)
    assert set(coef) == {n for n, _ in bb.named_parameters()} and len(hist) == 3
    assert any(not torch.allclose(c, torch.full((2,), 0.3)) for c in coef.values())
    out = merge_state_dicts("adamerging", base, experts, cfg, stats={"coefficients": coef})
    want = base["1.running_var"] + 0.3 * sum(
        e["1.running_var"] - base["1.running_var"] for e in experts
    )
    torch.testing.assert_close(out["1.running_var"], want)
