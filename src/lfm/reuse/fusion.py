"""A fusion table in FusionBench's form (Tang et al. 2024, arXiv 2406.03280).

One base backbone θ_b and K experts θ_k fine-tuned from it, each on its own task with its own head
h_k. Every merge method turns the K backbones into one θ; task k is scored with h_k(f(x; θ)), and
the table holds per-task and mean test accuracy for the base (with heads trained on its frozen
features), each expert on its own task, every merge and the output ensembles:

- λ of task arithmetic, TIES, DARE-TIES, Model Breadcrumbs and DELLA, and α of TSV-Merge, Iso-C
  and Iso-CTS, is the grid value with the best mean accuracy on a labelled validation split
  (Ilharco et al. 2022, arXiv 2212.04089); their other settings are the papers' defaults;
- Fisher and RegMean read statistics files computed on a few training inputs of each task;
- AdaMerging learns its coefficients on the unlabelled test inputs (Yang et al. 2023);
- the ensembles give task k every expert backbone with head k.

The backbone runs in eval mode throughout (`torch.func.functional_call` with each state dict), so
BatchNorm uses whatever running statistics the state dicts hold.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from lfm.access import Access, LocalClassifier, narrow
from lfm.config import Config
from lfm.core.measure import Measured, Meter
from lfm.reuse.adamerging import AdaMergingConfig, learn_coefficients
from lfm.reuse.driver import merge_state_dicts
from lfm.reuse.ensemble import ensemble_average, ensemble_vote
from lfm.reuse.stats import fisher, gram, save_stats

StateDict = dict[str, Tensor]
TA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # the task-arithmetic paper's grid
# α of the SVD merges scales a truncated or flattened spectrum, not the sum of the task vectors:
# their grid goes on past 1
SPECTRAL_GRID = (*TA_GRID, 1.25, 1.5, 1.75, 2.0)
Split = tuple[Tensor, Tensor]  # inputs, labels
SPECTRAL = ("tsv_merge", "iso_c", "iso_cts")


@dataclass
class FusionTask:
    """One task: its expert's head, labelled validation and test splits, inputs for statistics."""

    name: str
    head: nn.Module
    val: Split
    test: Split
    stats_x: Tensor  # training inputs for Fisher and Gram statistics
    probe_head: nn.Module | None = None  # a head trained on the frozen base: the "pretrained" row


class FusionConfig(Config):
    lambdas: tuple[float, ...] = TA_GRID  # λ grid of TA / TIES / DARE / Breadcrumbs / DELLA
    spectral_scales: tuple[float, ...] = SPECTRAL_GRID  # α grid of TSV-Merge / Iso-C / Iso-CTS
    ties_density: float = Field(0.2, gt=0, le=1)  # TIES keep fraction (paper: 0.2)
    dare_drop_rate: float = Field(0.9, ge=0, lt=1)  # DARE drop rate p (paper: 0.9)
    regmean_alpha: float = Field(0.9, ge=0, le=1)  # RegMean off-diagonal scale (paper: 0.9)
    fisher_kind: Literal["sample", "label", "exact"] = "sample"  # Fisher estimator (paper: sample)
    ada_steps: int = Field(500, ge=0)  # AdaMerging Adam steps (paper: 500)
    ada_lr: float = Field(1e-3, gt=0)  # AdaMerging learning rate (paper: 1e-3)
    ada_batch: int = Field(16, ge=1)  # unlabelled test inputs per task and step (paper: 16)
    ensembles: bool = True  # add the probability-average and majority-vote ensemble rows
    batch: int = Field(256, ge=1)  # evaluation batch size
    seed: int = 0  # DARE and DELLA masks, Fisher samples


@dataclass
class FusionResult:
    """Accuracies (row -> one per task), with the choices and seconds behind each row."""

    tasks: list[str]
    rows: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # What building each merged model cost (merging, λ search, learning), its scoring left out.
    costs: dict[str, Measured] = field(default_factory=dict)

    def markdown(self) -> str:
        """The table as Markdown, accuracies in percent, with a mean column."""
        lines = ["| method | " + " | ".join(self.tasks) + " | mean |"]
        lines.append("|---" * (len(self.tasks) + 2) + "|")
        for label, accs in self.rows.items():
            cells = [f"{100 * a:.1f}" for a in accs] + [f"{100 * sum(accs) / len(accs):.1f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


class _Net(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _loaded(backbone: nn.Module, sd: StateDict) -> nn.Module:
    bb = copy.deepcopy(backbone)
    bb.load_state_dict(sd)
    return bb.eval()


@torch.no_grad()
def accuracy(backbone: nn.Module, sd: StateDict, head: nn.Module, split: Split, batch=256) -> float:
    """Accuracy of head(backbone with weights `sd`) on (x, y)."""
    x, y = split
    preds = [head(functional_call(backbone, sd, (xb,))).argmax(-1) for xb in x.split(batch)]
    return float((torch.cat(preds) == y).float().mean())


def score(
    backbone: nn.Module, sd: StateDict, tasks: Sequence[FusionTask], split="test", batch=256
) -> list[float]:
    """Accuracy on every task, each with its own head."""
    return [accuracy(backbone, sd, t.head, getattr(t, split), batch) for t in tasks]


def pick_scale(
    method: str, backbone: nn.Module, base: StateDict, experts: list[StateDict],
    tasks: Sequence[FusionTask], extra: dict[str, Any], cfg: FusionConfig,
) -> tuple[StateDict, float]:  # fmt: skip
    """The merge whose λ gives the best mean validation accuracy (first of equals)."""
    best: tuple[StateDict, float, float] | None = None
    for lam in cfg.spectral_scales if method in SPECTRAL else cfg.lambdas:
        sd = merge_state_dicts(method, base, experts, {**extra, "scale": lam})
        val = sum(score(backbone, sd, tasks, "val", cfg.batch)) / len(tasks)
        if best is None or val > best[2]:
            best = (sd, lam, val)
    assert best is not None
    return best[0], best[1]


def save_statistics(
    root: Path, backbone: nn.Module, experts: list[StateDict], tasks: Sequence[FusionTask],
    cfg: FusionConfig,
) -> tuple[list[str], list[str]]:  # fmt: skip
    """Fisher (backbone parameters, through each task's head) and Gram files of every expert."""
    fis, grs = [], []
    for k, (sd, t) in enumerate(zip(experts, tasks, strict=True)):
        bb = _loaded(backbone, sd)
        f, count = fisher(_Net(bb, t.head), [t.stats_x], kind=cfg.fisher_kind, seed=cfg.seed + k)
        f = {n.removeprefix("backbone."): v for n, v in f.items() if n.startswith("backbone.")}
        fis.append(str(save_stats(root / f"fisher{k}.safetensors", f, "fisher", count=count)))
        g, orient, n = gram(bb, [t.stats_x])
        grs.append(str(save_stats(root / f"gram{k}.safetensors", g, "gram", count=n,
                                  orientation=orient)))  # fmt: skip
    return fis, grs


def ensemble_accuracy(
    backbone: nn.Module,
    experts: list[StateDict],
    tasks: Sequence[FusionTask],
    vote: bool,
    batch=256,
) -> list[float]:
    """Task k: every expert backbone with head k, averaged probabilities or a majority vote."""
    bbs = [_loaded(backbone, sd) for sd in experts]
    level = Access.TEXT if vote else Access.SCORES
    accs = []
    for t in tasks:
        hs = [narrow(LocalClassifier(_Net(bb, t.head).eval()), level) for bb in bbs]
        x, y = t.test
        pred = [ensemble_vote(hs, xb) if vote else ensemble_average(hs, xb).argmax(-1)
                for xb in x.split(batch)]  # fmt: skip
        accs.append(float((torch.cat(pred) == y).float().mean()))
    return accs


def _adamerging(backbone, base, experts, tasks, cfg: FusionConfig, granularity: str, notes):
    ada = AdaMergingConfig.build(granularity=granularity, lr=cfg.ada_lr, steps=cfg.ada_steps)
    unl = [list(t.test[0].split(cfg.ada_batch)) for t in tasks]
    heads = [t.head.eval() for t in tasks]
    coef, hist = learn_coefficients(backbone, base, experts, unl, ada, heads=heads)
    notes[f"adamerging_{granularity}_entropy"] = (hist[0], hist[-1]) if hist else None
    return merge_state_dicts("adamerging", base, experts, ada, stats={"coefficients": coef})


def fusion_table(
    backbone: nn.Module, base: StateDict, experts: list[StateDict], tasks: Sequence[FusionTask],
    workdir: str | Path, cfg: FusionConfig | None = None, log: Callable[[str], None] = print,
) -> FusionResult:  # fmt: skip
    """Score the base, the experts, every merge of the experts and the ensembles on every task.

    Args:
        backbone: a module of the shared architecture (its own weights are not used); it is put
            in eval mode.
        base: the pretrained backbone's state dict; experts: one fine-tuned state dict per task.
        tasks: per task, the expert's head and the data (same order as `experts`).
        workdir: where the Fisher and Gram statistics files are written.
        cfg: the λ grid and the methods' settings.
        log: called with one line per finished row.
    """
    cfg, root = cfg or FusionConfig(), Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    backbone.eval()
    res = FusionResult([t.name for t in tasks])

    def row(label: str, fn: Callable[[], list[float]]) -> None:
        t0 = time.process_time()
        res.rows[label] = fn()
        res.seconds[label] = time.process_time() - t0
        mean = 100 * sum(res.rows[label]) / len(tasks)
        log(f"{label:<32} mean {mean:5.1f}  ({res.seconds[label]:.0f} CPU s)")

    def built(label: str, build: Callable[[], StateDict]) -> list[float]:
        with Meter(backbone) as meter:
            sd = build()
        res.costs[label] = meter.result  # type: ignore[assignment]
        return score(backbone, sd, tasks, "test", cfg.batch)

    def merged(label: str, method: str, extra: dict | None = None) -> list[float]:
        # methods without a base model
        return built(label, lambda: merge_state_dicts(method, None, experts, extra))

    def scaled(label: str, method: str, extra: dict[str, Any]) -> list[float]:
        def build() -> StateDict:
            sd, res.notes[f"{method}_scale"] = pick_scale(
                method, backbone, base, experts, tasks, extra, cfg
            )
            return sd

        return built(label, build)

    def ada(label: str, granularity: str) -> list[float]:
        return built(
            label, lambda: _adamerging(backbone, base, experts, tasks, cfg, granularity, res.notes)
        )

    probes = [t.probe_head for t in tasks]
    if all(h is not None for h in probes):
        row("pretrained", lambda: [accuracy(backbone, base, h, t.test, cfg.batch)  # type: ignore[arg-type]
                                   for h, t in zip(probes, tasks, strict=True)])  # fmt: skip
    row("individual", lambda: [accuracy(backbone, sd, t.head, t.test, cfg.batch)
                               for sd, t in zip(experts, tasks, strict=True)])  # fmt: skip
    row("average", lambda: merged("average", "linear"))
    row("task arithmetic", lambda: scaled("task arithmetic", "task_arithmetic", {}))
    row("TIES", lambda: scaled("TIES", "ties", {"density": cfg.ties_density}))
    dare = {"drop_rate": cfg.dare_drop_rate, "seed": cfg.seed}
    row("DARE-TIES", lambda: scaled("DARE-TIES", "dare_ties", dare))
    row("Breadcrumbs", lambda: scaled("Breadcrumbs", "breadcrumbs", {}))
    row("DELLA", lambda: scaled("DELLA", "della", {"seed": cfg.seed}))
    for label, method in zip(("TSV-Merge", "Iso-C", "Iso-CTS"), SPECTRAL, strict=True):
        row(label, functools.partial(scaled, label, method, {}))
    t0 = time.process_time()
    fis, grs = save_statistics(root, backbone, experts, tasks, cfg)
    res.seconds["statistics"] = time.process_time() - t0
    row("Fisher", lambda: merged("Fisher", "fisher", {"stats": fis}))
    regmean = {"stats": grs, "alpha": cfg.regmean_alpha}
    row("RegMean", lambda: merged("RegMean", "regmean", regmean))
    row("AdaMerging (task-wise)", lambda: ada("AdaMerging (task-wise)", "task"))
    row("AdaMerging (layer-wise)", lambda: ada("AdaMerging (layer-wise)", "layer"))
    if cfg.ensembles:
        row(
            "ensemble: prob. average",
            lambda: ensemble_accuracy(backbone, experts, tasks, False, cfg.batch),
        )
        row(
            "ensemble: majority vote",
            lambda: ensemble_accuracy(backbone, experts, tasks, True, cfg.batch),
        )
    return res
