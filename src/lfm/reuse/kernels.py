"""Per-tensor merging kernels: pure functions of tensors, no I/O, no registry.

Every kernel takes the tensors that one parameter has in each model (and in the base model where
the method needs one) and returns the merged tensor. Maths in float32; callers cast back.

- linear / model soups (Wortsman et al. 2022, arXiv 2203.05482):  θ = Σ w_i θ_i / Σ w_i
- task arithmetic (Ilharco et al. 2022, arXiv 2212.04089):  τ_i = θ_i − θ_b,  θ = θ_b + λ Σ w_i τ_i
- TIES (Yadav et al. 2023, arXiv 2306.01708): trim τ_i to its top-k magnitudes, elect
  γ = sgn(Σ_i τ̂_i), disjoint mean over A = {i : sgn(τ̂_i) = γ}:  θ = θ_b + λ Σ_{i∈A} τ̂_i / |A|
- DARE (Yu et al. 2023, arXiv 2311.03099): τ̃_i = m ⊙ τ_i / (1 − p),  m ~ Bernoulli(1 − p)
- Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): keep the entries of τ_i whose
  magnitude lies between the smallest γ and the largest β fraction:  τ̃_i = m ⊙ τ_i
- DELLA's MagPrune (Deep et al. 2024, arXiv 2406.11617): drop entry j with probability
  p_j = p − ε/2 + ε · r_j / (n − 1), r_j its magnitude rank in its row (0: the largest), and
  rescale the kept ones:  τ̃_ij = m_j τ_ij / (1 − p_j),  m_j ~ Bernoulli(1 − p_j)
- SLERP (Shoemake 1985): θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1,  cos Ω = θ̂_0·θ̂_1
- Model Stock (Jang et al. 2024, arXiv 2403.19522): t = k cos φ / (1 + (k−1) cos φ),
  θ = t · mean(θ_i) + (1 − t) · θ_b,  φ the mean angle between fine-tuned task vectors
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ w_i x_i in float32."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for x, w in zip(tensors, weights, strict=True):
        out.add_(x.float(), alpha=float(w))
    return out


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Weighted average (a uniform soup when all weights are equal).

    Args:
        tensors: one tensor per model, same shape.
        weights: one weight per model.
        normalize: divide by Σ w_i (an average) instead of returning the weighted sum.
    """
    out = weighted_sum(tensors, weights)
    total = float(sum(weights))
    if normalize and total != 0:
        out /= total
    return out


def task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """τ_i = θ_i − θ_base, in float32."""
    b = base.float()
    return [x.float() - b for x in tensors]


def kth_largest(values: Tensor, k: int, *, overwrite: bool = False) -> float:
    """The k-th largest entry of a flat tensor (k ≥ 1), exactly.

    A selection, not a sort or `topk`. On the CPU, a tensor of at least `BOUNDED_OVER` entries
    first goes through `bounded_kth` (bounds from a sample, then a selection among the entries
    between them), else, and where the bounds miss, NumPy's introselect (`partition`, itself
    ~15x faster than `torch.kthvalue` on one thread).

    Args:
        values: any shape; read as flat.
        k: the rank from the top (1 = the largest).
        overwrite: `values` may be reordered in place (saves a copy of a scratch tensor).
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        # on an accelerator, its own selection where the tensor is (no copy to the host)
        return float(torch.kthvalue(flat.float(), n - k + 1).values)
    arr = flat.numpy()  # a view of `values` when contiguous, else a copy of our own
    if n >= BOUNDED_OVER:
        found = bounded_kth(arr, k)
        if found is not None:
            return found
    if overwrite:
        arr.partition(n - k)
        return float(arr[n - k])
    return float(np.partition(arr, n - k)[n - k])


BOUNDED_OVER = 1 << 16  # entries: from here on `kth_largest` tries `bounded_kth` first
SAMPLE_EVERY = 16  # the sample that bounds the k-th largest: every 16th entry


def bounded_kth(arr: np.ndarray, k: int) -> float | None:
    """The k-th largest entry of a flat array, or None where a sample's bounds miss it.

    Every `SAMPLE_EVERY`-th entry (m of them) gives bounds lo ≤ hi, the sample's order
    statistics six standard deviations of the sample's rank either side of the k-th largest's
    quantile. With a entries above hi and b between lo and hi, the answer is the (k − a)-th
    largest of those b when a < k ≤ a + b: selections over m and b entries (b about 2 % of n for
    SmolLM2's MLP matrices at TIES's density) and three comparisons over n, instead of a
    selection over n. Any other case (the bounds miss, or NaNs, which fall in none of the three
    counts and which `partition` places last) is None, and the caller selects over the whole
    array.
    """
    bounds = _sample_bounds(arr[::SAMPLE_EVERY], arr.size, k)
    return None if bounds is None else _select_between([arr], arr.size, k, *bounds)


def _sample_bounds(sample: np.ndarray, n: int, k: int) -> tuple[float, float] | None:
    """`bounded_kth`'s bounds lo ≤ hi on the k-th largest of n entries, from every
    `SAMPLE_EVERY`-th of them; None when either is NaN."""
    q = 1 - k / n  # the answer's quantile from the bottom
    m = sample.size
    half = 6 * math.sqrt(m * q * (1 - q)) + 2
    ranks = [max(0, int(q * m - half)), min(m - 1, math.ceil(q * m + half))]
    lo, hi = np.partition(sample, ranks)[ranks]
    if np.isnan(lo) or np.isnan(hi):
        return None
    return float(lo), float(hi)


def _select_between(
    parts: Iterable[np.ndarray], n: int, k: int, lo: float, hi: float
) -> float | None:
    """The k-th largest of the n entries of `parts` (arrays read once each, in turn) when it lies
    between lo and hi, else None (see `bounded_kth`)."""
    above = below = 0
    bands = []
    for arr in parts:
        above += int(np.count_nonzero(arr > hi))
        if above >= k:
            return None
        bands.append(arr[(arr >= lo) & (arr <= hi)])  # a copy: `arr` may be a reused buffer
        below += int(np.count_nonzero(arr < lo))
    band = bands[0] if len(bands) == 1 else np.concatenate(bands)
    rank = k - above  # from the top of the band
    if rank > band.size or above + band.size + below != n:
        return None
    band.partition(band.size - rank)
    return float(band[band.size - rank])


CHUNK = 1 << 20  # entries of one chunk of a tensor merged chunk by chunk (4 MiB in float32)
CHUNKED_OVER = 1 << 23  # entries (32 MiB in float32): larger CPU tensors go chunk by chunk


def chunked(x: Tensor) -> bool:
    """Whether a kernel should take `x` chunk by chunk: a CPU tensor of more than
    `CHUNKED_OVER` entries.

    glibc serves allocations above 32 MiB with fresh pages from the kernel, every time: a
    whole-tensor temporary of SmolLM2's embedding (113 MB) costs 27,600 page faults. Chunks of
    `CHUNK` entries come from the heap and are reused.
    """
    return x.device.type == "cpu" and x.numel() > CHUNKED_OVER


def by_chunks(
    fn: Callable[[Tensor, list[Tensor]], Tensor], base: Tensor, tensors: Sequence[Tensor]
) -> Tensor:
    """fn(base, tensors) for an elementwise fn, computed on `CHUNK` entries at a time into one
    float32 output of base's shape (the same floats as fn on the whole tensors)."""
    out = torch.empty(base.shape, dtype=torch.float32)
    flat, b, xs = out.view(-1), base.reshape(-1), [x.reshape(-1) for x in tensors]
    for s in range(0, flat.numel(), CHUNK):
        e = min(flat.numel(), s + CHUNK)
        flat[s:e] = fn(b[s:e], [x[s:e] for x in xs])
    return out


def difference_threshold(x: Tensor, base: Tensor, density: float) -> float:
    """`magnitude_threshold(x − base, density)` with the task vector in float32, taken chunk by
    chunk (one reused buffer) when `chunked(x)`: the same value, without the two whole-tensor
    temporaries (x − base and its magnitudes)."""
    if not chunked(x):
        return magnitude_threshold(x.float() - base.float(), density)
    n = x.numel()
    k = keep_count(n, density)
    if k == 0:
        return math.inf
    fx, fb = x.reshape(-1), base.reshape(-1)
    sample = (fx[::SAMPLE_EVERY].float() - fb[::SAMPLE_EVERY].float()).abs_()
    bounds = _sample_bounds(sample.numpy(), n, k)
    if bounds is not None:
        scratch = torch.empty(CHUNK)

        def parts() -> Iterator[np.ndarray]:
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                yield (
                    torch.sub(fx[s:e].float(), fb[s:e].float(), out=scratch[: e - s]).abs_().numpy()
                )

        found = _select_between(parts(), n, k, *bounds)
        if found is not None:
            return found
    return magnitude_threshold(x.float() - base.float(), density)


def keep_count(n: int, density: float) -> int:
    """How many of n entries a density keeps (rounded, at least 0, at most n)."""
    return min(n, max(0, round(density * n)))


def magnitude_threshold(tau: Tensor, density: float) -> float:
    """The magnitude at and above which `density` of the entries of `tau` lie (per tensor)."""
    k = keep_count(tau.numel(), density)
    if k == 0:
        return math.inf
    return kth_largest(tau.abs(), k, overwrite=True)


def trim(tau: Tensor, threshold: float, *, inplace: bool = False) -> Tensor:
    """Zero the entries whose magnitude is below `threshold` (ties at the threshold are kept).

    One fused pass: `hardshrink` keeps |x| > λ, and with λ the float just below the threshold
    (in the dtype of `tau`) that is exactly |x| ≥ threshold.

    Args:
        tau: a task vector.
        threshold: the smallest magnitude kept.
        inplace: overwrite `tau` (a task vector of the caller's own) instead of a copy.
    """
    if tau.dtype not in (torch.float32, torch.float64) or math.isnan(threshold):
        out = torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
        return tau.copy_(out) if inplace else out
    return torch.hardshrink(tau, _below(threshold, tau.dtype), out=tau if inplace else None)


def _below(x: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` that is < x (x rounded up into `dtype` first)."""
    npt = np.float32 if dtype == torch.float32 else np.float64
    up = npt(x)
    if float(up) < x:
        up = np.nextafter(up, npt(np.inf))
    return float(np.nextafter(up, npt(-np.inf)))


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A deterministic 63-bit seed for one tensor of one model (independent of the order of keys):
    the first 8 bytes of SHA-256("seed:name:index"), little-endian, shifted right by one bit."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dare(
    tau: Tensor,
    drop_rate: float,
    seed: int | np.random.Generator,
    *,
    inplace: bool = False,
    scratch: Tensor | None = None,
) -> Tensor:
    """Drop each entry with probability p and rescale the kept ones by exactly 1/(1 − p).

    The mask compares float32 uniforms from NumPy's PCG64, seeded with `seed`, against p: about
    30 % faster than `torch.rand` (MT19937) on one CPU thread, and written straight into `scratch`.
    It is drawn on the CPU and moved to tau's device: the same mask on any device.

    Args:
        tau: a task vector (on any device).
        drop_rate: p.
        seed: seeds this tensor's mask; or a generator to draw it from, where a tensor is taken
            chunk by chunk (successive draws continue one stream: the mask of the whole).
        inplace: overwrite `tau` (a task vector of the caller's own) instead of a copy.
        scratch: a contiguous float32 CPU tensor of tau's shape to hold the mask (overwritten);
            reusing one for several models saves an allocation (and its page faults) per model.
    """
    if drop_rate <= 0:
        return tau
    keep = torch.empty(tau.shape) if scratch is None else scratch
    if keep.dtype != torch.float32 or not keep.is_contiguous() or keep.shape != tau.shape:
        raise ValueError("scratch must be a contiguous float32 tensor of the task vector's shape")
    rng = (
        seed
        if isinstance(seed, np.random.Generator)
        else np.random.Generator(np.random.PCG64(seed))
    )
    rng.random(dtype=np.float32, out=keep.numpy().reshape(-1))  # a view: fills `keep` in place
    keep.ge_(drop_rate)  # 1.0 kept, 0.0 dropped
    out = tau.div_(1.0 - drop_rate) if inplace else tau / (1.0 - drop_rate)
    return out.mul_(keep.to(tau.device))  # a float mask: boolean masks are ~10x slower on CPU


def middle_band(tau: Tensor, drop_top: float, drop_bottom: float) -> Tensor:
    """Model Breadcrumbs' mask: zero the largest `drop_top` and the smallest `drop_bottom` fraction
    of the magnitudes of `tau` (over the whole tensor, one layer as the paper masks it).

    The kept entries are the ranks n_top + 1 ... n − n_bottom from the top (n_top = round(β n),
    n_bottom = round(γ n)); entries tied in magnitude with either edge of the band are kept too.

    Args:
        tau: a task vector.
        drop_top: β, the fraction of largest magnitudes removed (outliers).
        drop_bottom: γ, the fraction of smallest magnitudes removed (negligible changes).
    """
    n = tau.numel()
    top, bottom = keep_count(n, drop_top), keep_count(n, drop_bottom)
    kept = n - top - bottom
    if kept <= 0:
        return torch.zeros_like(tau)
    mags = tau.abs()
    hi = kth_largest(mags, top + 1)  # the largest magnitude kept
    lo = kth_largest(mags, top + kept)  # the smallest magnitude kept
    return torch.where((mags >= lo) & (mags <= hi), tau, torch.zeros_like(tau))


def rank_drop_probabilities(tau: Tensor, drop_rate: float, window: float) -> Tensor:
    """DELLA's drop probability of every entry, p − ε/2 for the largest magnitude of its row up to
    p + ε/2 for the smallest, linear in the rank (a row: `tau` viewed as (shape[0], -1); a vector
    or scalar is one row; the one entry of a row of one gets p).

    Args:
        tau: a task vector.
        drop_rate: p, the mean drop probability.
        window: ε, the width of the range of probabilities.
    """
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full(tau.shape, float(drop_rate), device=tau.device)
    order = rows.abs().argsort(dim=1, descending=True, stable=True)  # (rows, n): largest first
    ranks = torch.arange(n, device=tau.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    p = (drop_rate - window / 2) + window * (rank.float() / (n - 1))
    return p.reshape(tau.shape)


def magprune(tau: Tensor, drop_rate: float, window: float, seed: int) -> Tensor:
    """DELLA's MagPrune: drop each entry with its rank's probability p_j and rescale the kept ones
    by 1/(1 − p_j), so that the expectation of the result is `tau`.

    The mask compares float32 uniforms from NumPy's PCG64, seeded with `seed` (as DARE's), with p_j:
    drawn on the CPU and moved to tau's device: the same uniforms on any device.

    Args:
        tau: a task vector (on any device).
        drop_rate: p, the mean drop probability.
        window: ε, the width of the range of probabilities (p ± ε/2).
        seed: seeds this tensor's mask.
    """
    p = rank_drop_probabilities(tau, drop_rate, window)
    uniforms = torch.empty(tau.shape)
    rng = np.random.Generator(np.random.PCG64(seed))
    rng.random(dtype=np.float32, out=uniforms.numpy().reshape(-1))
    kept = uniforms.to(tau.device) >= p  # with probability 1 − p_j
    return torch.where(kept, tau.float() / (1.0 - p), torch.zeros_like(p))


def elect_sign(taus: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """γ = sgn(Σ_i w_i τ_i): the sign with the larger total mass per coordinate."""
    return weighted_sum(taus, weights).sign_()


def disjoint_merge(
    taus: Sequence[Tensor], weights: Sequence[float], sign: Tensor, normalize: bool = True
) -> Tensor:
    """Σ_{i∈A} w_i τ_i (/ Σ_{i∈A} w_i when `normalize`) over the models that agree with `sign`.

    With positive weights every agreeing term has the sign γ, so the sum is γ · Σ w_i max(γ τ_i, 0):
    in-place float passes, no boolean masks, the same floats as the masked form.
    """
    if any(w <= 0 for w in weights):
        return _disjoint_merge_masked(taus, weights, sign, normalize)
    total, mass = torch.zeros_like(sign), torch.zeros_like(sign)
    agreed, mask = torch.empty_like(sign), torch.empty_like(sign)
    for tau, w in zip(taus, weights, strict=True):
        torch.mul(tau, sign, out=agreed).clamp_min_(0)  # |τ_i| where sgn τ_i = γ ≠ 0, else 0
        torch.sign(agreed, out=mask)  # 1 where model i agrees, else 0
        total.add_(agreed if w == 1 else agreed.mul_(w))
        mass.add_(mask, alpha=w)
    total.mul_(sign)
    if not normalize:
        return total
    return total.div_(mass.add_(torch.eq(mass, 0, out=mask)))  # 0 / 1 where no model agrees


def _disjoint_merge_masked(
    taus: Sequence[Tensor], weights: Sequence[float], sign: Tensor, normalize: bool
) -> Tensor:
    """The disjoint merge with explicit masks (any weights, also zero or negative)."""
    total = torch.zeros_like(sign)
    mass = torch.zeros_like(sign)
    for tau, w in zip(taus, weights, strict=True):
        agree = (torch.sign(tau) == sign) & (sign != 0)
        total += torch.where(agree, tau * w, 0.0)
        mass += agree.float() * w
    if not normalize:
        return total
    return torch.where(mass != 0, total / mass.where(mass != 0, torch.ones_like(mass)), 0.0)


def task_merge(
    base: Tensor,
    taus: Sequence[Tensor],
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    consensus: bool = False,
    normalize: bool = True,
) -> Tensor:
    """θ_b + λ · combine(τ): a plain weighted sum, or TIES sign election + disjoint mean.

    Args:
        base: the base tensor θ_b.
        taus: task vectors, already trimmed or dropped as the method asks.
        weights: one weight per model.
        scale: λ.
        consensus: elect a sign per coordinate and average only the agreeing entries (TIES).
        normalize: with `consensus`, divide by the agreeing weights (the disjoint mean).
    """
    if consensus:
        delta = disjoint_merge(taus, weights, elect_sign(taus, weights), normalize)
    else:
        delta = weighted_sum(taus, weights)
    if scale != 1:
        delta.mul_(scale)
    return delta.add_(base.float())  # θ_b + λ δ, in place on the fresh δ


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 5e-4) -> Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), linear when nearly (anti)parallel.

    Args:
        a: the tensor at t=0.
        b: the tensor at t=1.
        t: the interpolation factor.
        eps: fall back to linear interpolation when 1 − |cos Ω| < eps (or a norm is below eps).
    """
    a32, b32 = a.float(), b.float()
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return torch.lerp(a32, b32, t)
    cos = float((a32.flatten() @ b32.flatten()) / (na * nb))
    cos = max(-1.0, min(1.0, cos))
    if 1.0 - abs(cos) < eps:
        return torch.lerp(a32, b32, t)
    omega = math.acos(cos)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a32 + (math.sin(t * omega) / s) * b32


def mean_pairwise_cosine(taus: Sequence[Tensor], eps: float = 1e-8) -> float:
    """The mean of cos(τ_i, τ_j) over all pairs i < j."""
    flat = [t.flatten().float() for t in taus]
    norms = [max(float(f.norm()), eps) for f in flat]
    cos = [
        float(flat[i] @ flat[j]) / (norms[i] * norms[j])
        for i in range(len(flat))
        for j in range(i + 1, len(flat))
    ]
    return sum(cos) / len(cos)


def model_stock_ratio(cos: float, k: int) -> float:
    """t = k cos φ / (1 + (k − 1) cos φ), with cos φ clamped to [0, 1] so that t ∈ [0, 1]."""
    c = max(0.0, min(1.0, cos))
    return k * c / (1 + (k - 1) * c)


def model_stock(base: Tensor, tensors: Sequence[Tensor], eps: float = 1e-8) -> Tensor:
    """θ = t · mean(θ_i) + (1 − t) · θ_b, t from the mean angle between the task vectors."""
    t = model_stock_ratio(mean_pairwise_cosine(task_vectors(base, tensors), eps), len(tensors))
    mean = linear(tensors, [1.0] * len(tensors))
    return t * mean + (1 - t) * base.float()
