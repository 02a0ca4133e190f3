"""Model-wide magnitude thresholds for TIES trimming over the whole model (`trim_scope="model"`).

TIES (Yadav et al. 2023, arXiv 2306.01708) keeps the top-k% entries of each task vector τ_i by
magnitude. Over a whole model this needs the k-th largest |τ_i| among billions of entries without
holding them all. Three streamed passes give it exactly, with memory bounded by one tensor and
one bucket:

1. count the entries and find the smallest and largest positive magnitude;
2. histogram log|τ| into `BINS` buckets, find the bucket that holds the k-th largest entry;
3. gather only that bucket's entries and take the exact k-th largest among them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lfm.reuse.kernels import keep_count, kth_largest

BINS = 1 << 16

Magnitudes = Callable[[], Iterator[Tensor]]  # a fresh pass over |τ| of one model, tensor by tensor


def _range(mags: Magnitudes) -> tuple[int, float, float]:
    n, lo, hi = 0, math.inf, 0.0
    for m in mags():
        n += m.numel()
        pos = m[m > 0]
        if pos.numel():
            lo, hi = min(lo, float(pos.min())), max(hi, float(pos.max()))
    return n, lo, hi


def _bucket(m: Tensor, lo: float, hi: float) -> Tensor:
    """Bucket index of each positive magnitude on a log scale (the same rule in both passes)."""
    span = max(math.log(hi) - math.log(lo), 1e-30)
    pos = (torch.log(m.double()) - math.log(lo)) / span * BINS
    return pos.floor().clamp(0, BINS - 1).long()


def _histogram(mags: Magnitudes, lo: float, hi: float) -> Tensor:
    counts = torch.zeros(BINS, dtype=torch.long)
    for m in mags():
        pos = m[m > 0].flatten()
        counts += torch.bincount(_bucket(pos, lo, hi), minlength=BINS)
    return counts


def _gather(mags: Magnitudes, lo: float, hi: float, bucket: int) -> Tensor:
    parts = []
    for m in mags():
        pos = m[m > 0].flatten()
        parts.append(pos[_bucket(pos, lo, hi) == bucket])
    return torch.cat(parts)


def model_threshold(mags: Magnitudes, density: float) -> float:
    """The k-th largest magnitude over all tensors of one model, k = round(density · n).

    Args:
        mags: returns a fresh iterator over the magnitudes of one model's task vector.
        density: the fraction of entries to keep.
    """
    n, lo, hi = _range(mags)
    k = keep_count(n, density)
    if k == 0:
        return math.inf
    if hi == 0.0:
        return 0.0
    counts = _histogram(mags, lo, hi)
    above = torch.flip(counts, [0]).cumsum(0)  # above[j]: entries in the top j+1 buckets
    if int(above[-1]) < k:  # the k-th largest is a zero: keep everything
        return 0.0
    j = int(torch.searchsorted(above, k))
    bucket = BINS - 1 - j
    before = int(above[j - 1]) if j > 0 else 0
    return kth_largest(_gather(mags, lo, hi, bucket), k - before)
