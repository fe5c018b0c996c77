"""Shared pieces of the pruning kernels: the result type, argument checks, mask selection, statistics.

Every weight is ``[out, in]``; statistics are kept in float32 whatever the model dtype, because
sums of squares over thousands of tokens overflow or lose all precision in half precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class PruneResult:
    weight: torch.Tensor  # pruned weight, [out, in], same dtype/device as the input weight
    mask: torch.Tensor  # bool [out, in], True = kept

    @classmethod
    def from_mask(cls, weight: torch.Tensor, mask: torch.Tensor) -> PruneResult:
        """Zero ``weight`` where ``mask`` is False, leaving the input tensor untouched."""
        return cls(weight=weight.detach().masked_fill(~mask, 0), mask=mask)


def num_to_prune(numel: int, sparsity: float) -> int:
    """The single rounding rule used project-wide: int(round(sparsity * numel))."""
    return int(round(sparsity * numel))


def validate_pattern(in_features: int, sparsity: float, n: int, m: int) -> None:
    """Raise ValueError with a clear one-line message: sparsity outside [0,1); N:M with not 0<N<M; M not dividing in_features."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if n == 0 and m == 0:
        return
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"N:M pattern {n}:{m}: M={m} does not divide in_features={in_features}")


def all_finite(tensor: torch.Tensor) -> bool:
    """True if no entry is NaN or +-inf."""
    if tensor.numel() == 0:
        return True
    # min and max propagate NaN and are infinite if any entry is: one reduction and no bool
    # temporary, about 10x faster than isfinite().all() on a contiguous matrix (aminmax is slow on
    # a strided one, where |t|.max() is the faster single pass).
    t = tensor.detach()
    if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous():
        t = t.T  # the same entries (a column-major matrix, as addmm may return a Hessian)
    if not t.is_contiguous():
        return bool(torch.isfinite(t.abs().amax()))
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise FloatingPointError(f"{name}: contains NaN or inf") if not all finite."""
    if not all_finite(tensor):
        raise FloatingPointError(f"{name}: contains NaN or inf")


def check_weight(weight: torch.Tensor, sparsity: float, n: int, m: int) -> None:
    """The checks every kernel makes on its weight before pruning it."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    validate_pattern(weight.shape[1], sparsity, n, m)
    check_finite("weight", weight)


def prune_lowest(
    scores: torch.Tensor, sparsity: float, n: int = 0, m: int = 0, per_row: bool = False
) -> torch.Tensor:
    """Keep-mask (bool, True=kept) that prunes the lowest scores: N:M (n>0) -> in every row's consecutive group of m input columns prune the n lowest;
    else unstructured: per_row -> exactly num_to_prune(cols, s) lowest in each row; else exactly num_to_prune(numel, s) lowest in the whole tensor.
    Exact counts (use sort/topk, not a threshold that can tie)."""
    validate_pattern(scores.shape[-1], sparsity, n, m)
    # Ties are broken by position (the lower index is pruned first), so every process that holds the
    # same scores (federated clients, the server) derives the same mask.
    if n:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        order = scores.reshape(-1, m).argsort(dim=1, stable=True)
        mask.view(-1, m).scatter_(1, order[:, :n], False)
        return mask
    rows = scores.reshape(-1, scores.shape[-1]) if per_row else scores.reshape(1, -1)
    return ~_lowest_k(rows, num_to_prune(rows.shape[1], sparsity)).reshape(scores.shape)


def _lowest_k(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [r, c]: the k lowest entries of every row, ties taken in index order.

    The same set as the first k of a stable argsort, found by selection (O(c)) rather than a sort:
    everything below the k-th value, then as many entries equal to it as are still needed.
    """
    if k == 0:
        return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    if rows.shape[0] == 1 and rows.dtype == torch.float32 and rows.shape[1] >= _RADIX_MIN:
        kth = kth_smallest_float(rows.reshape(-1), k).reshape(1, 1)
    else:
        kth = rows.kthvalue(k, dim=1, keepdim=True).values
    at_most = rows <= kth
    if bool((at_most.sum(dim=1) == k).all()):
        return at_most  # no tie at the k-th value to break: the common case for real-valued scores
    below = rows < kth
    tied = rows == kth
    still_needed = k - below.sum(dim=1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=1) <= still_needed))


_RADIX_MIN = 4096


def kth_smallest_float(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of finite float32 or float64 ``values``, as kthvalue finds it, 5x
    faster on 10^5 entries: count the entries per value of the upper 16 bits of an order-preserving
    integer key, and run kthvalue only on the bucket the k-th falls in (typically under 1% of them)."""
    width = values.element_size() * 8
    bits = values.contiguous().view(torch.int32 if width == 32 else torch.int64)
    shift = width - 16
    bucket = bits >> shift
    low = int(bucket.min())
    if low < 0:
        # Negative floats sort in reverse by their bits: flipping all but the sign bit fixes the order.
        bucket = (bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))) >> shift
        low = int(bucket.min())
    counts = torch.bincount(bucket - low, minlength=1).cumsum(0)
    chosen = int(torch.searchsorted(counts, k))  # first bucket whose running count reaches k
    before = int(counts[chosen - 1]) if chosen else 0
    return values[bucket == chosen + low].kthvalue(k - before).values


def _running_mean(
    stat: torch.Tensor | None,
    nsamples: int,
    inputs: torch.Tensor,
    ndim: int,
    update: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """stat' = update(stat, X, n/(n+b), 1/(n+b)) with X the fp32 tokens [tokens, in] of ``inputs``."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    # As in SparseGPT, a sample is a sequence; a 2-D input is taken as one sequence of tokens.
    batch = inputs.shape[0] if inputs.dim() == 3 else 1
    if stat is None:
        stat, nsamples = x.new_zeros((x.shape[1],) * ndim), 0
    total = nsamples + batch
    if total == 0:
        return stat, 0
    return update(stat, x, nsamples / total, 1.0 / total), total


def accumulate_hessian(
    hessian: torch.Tensor | None, nsamples: int, inputs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Running H = (2/n) sum X X^T  (H *= n/(n+b); n += b; H += (2/n) X X^T). Returns (H [in,in] fp32, new n)."""
    # One fused op into a new tensor: the caller's H is never modified behind its back.
    def update(h: torch.Tensor, x: torch.Tensor, keep: float, inv_n: float) -> torch.Tensor:
        return torch.addmm(h, x.T, x, beta=keep, alpha=2 * inv_n)

    return _running_mean(hessian, nsamples, inputs, 2, update)


def accumulate_sq_norms(
    sq_norms: torch.Tensor | None, nsamples: int, inputs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Wanda's running mean of squared input-column norms: s *= n/(n+b); n += b; s += ||X_j||^2 / n. Returns ([in] fp32, new n)."""
    def update(s: torch.Tensor, x: torch.Tensor, keep: float, inv_n: float) -> torch.Tensor:
        return s * keep + x.square().sum(dim=0) * inv_n

    return _running_mean(sq_norms, nsamples, inputs, 1, update)
