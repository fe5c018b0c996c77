"""Server-side aggregation of pruned weight matrices (DESIGN.md, "The method", steps 5 and 6).

Pure functions on one weight matrix ``[out, in]``. A :class:`Contribution` holds sums only
(Σ M_i⊙W_i, Σ M_i and the contributor count), so contributions from several clients, rounds or
processes combine by addition: :func:`merge` locally, ``all_reduce(SUM)`` across processes.
Every function here is deterministic given its inputs (``mask_vote`` given its generator), so
each process computes the same aggregate from the same reduced sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedspallm.errors import UserError
from fedspallm.pruners.common import PruneResult, all_finite, kth_smallest_float, num_to_prune, validate_pattern

AGGREGATION_METHODS = ("l0", "fedavg")


@dataclass
class Contribution:
    """Sums over the (client, round) pairs that pruned one matrix."""

    weight_sum: torch.Tensor  # float64 [out, in]: Σ M_i ⊙ W_i
    keep_count: torch.Tensor  # int32 [out, in]: Σ M_i (how many contributors kept each weight)
    contributors: int  # how many (client, round) pairs pruned this matrix


def contribute(acc: Contribution | None, weight: torch.Tensor, mask: torch.Tensor) -> Contribution:
    """``acc`` plus one client's pruned matrix (``mask`` True = kept). ``acc`` is not modified."""
    if weight.shape != mask.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.to(torch.bool)
    one = Contribution(
        weight_sum=torch.where(mask, weight.detach().to(torch.float64), 0.0),
        keep_count=mask.to(torch.int32),
        contributors=1,
    )
    return one if acc is None else merge(acc, one)


def merge(a: Contribution, b: Contribution) -> Contribution:
    """The contribution of both sets of contributors."""
    if a.weight_sum.shape != b.weight_sum.shape:
        shapes = f"{tuple(a.weight_sum.shape)} and {tuple(b.weight_sum.shape)}"
        raise ValueError(f"cannot merge contributions of shapes {shapes}")
    return Contribution(
        weight_sum=a.weight_sum + b.weight_sum,
        keep_count=a.keep_count + b.keep_count,
        contributors=a.contributors + b.contributors,
    )


class WeightedSum:
    """FedAvg's summable contribution (sparse fine-tuning): Σ w_i·x_i per named tensor, in float64, and Σ w_i.

    Like :class:`Contribution` it combines by addition: locally with :meth:`add`, across processes by
    summing :meth:`tensors` (kind ``fit_weights``) through the driver's reducer; :func:`weighted_average`
    turns the sums into the average.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None
        self.weight = 0.0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight < 0:
            raise ValueError(f"FedAvg weight {weight} is negative")
        scaled = {name: t.detach().double() * weight for name, t in tensors.items()}
        self.sums = scaled if self.sums is None else {name: s.add_(scaled[name]) for name, s in self.sums.items()}
        self.weight += weight

    def tensors(self) -> dict[str, torch.Tensor]:
        """The sums to reduce: every named sum and the total weight (under ``WEIGHT``)."""
        if self.sums is None:
            raise ValueError("nothing added: every process needs at least one client")
        return {**self.sums, WEIGHT: torch.tensor([self.weight], dtype=torch.float64)}


WEIGHT = "__weight__"


def weighted_average(sums: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Σ w_i·x_i / Σ w_i`` from (reduced) :meth:`WeightedSum.tensors`, in the dtypes of ``like``."""
    total = float(sums[WEIGHT].item())
    if total <= 0:
        raise ValueError("FedAvg over a total weight of 0")
    return {name: (sums[name] / total).to(t.dtype) for name, t in like.items()}


def l0_average(c: Contribution) -> torch.Tensor:
    """ℓ0-norm average: each weight averaged over the contributors that kept it; 0 if none did."""
    return torch.where(c.keep_count > 0, c.weight_sum / c.keep_count.clamp_min(1), 0.0)


def plain_average(c: Contribution) -> torch.Tensor:
    """FedAvg: each weight averaged over all contributors, pruned zeros included."""
    if c.contributors < 1:
        raise ValueError("no contributors to average")
    return c.weight_sum / c.contributors


def prune_votes(c: Contribution) -> torch.Tensor:
    """How many contributors pruned each weight."""
    return c.contributors - c.keep_count


def _check_pattern(weight: torch.Tensor, votes: torch.Tensor, sparsity: float, n: int, m: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a [out, in] matrix, got shape {tuple(weight.shape)}")
    if votes.shape != weight.shape:
        raise ValueError(f"votes {tuple(votes.shape)} and weight {tuple(weight.shape)} differ in shape")
    validate_pattern(weight.shape[1], sparsity, n, m)


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """[out, in] -> [groups, size]: the whole matrix as one group (m = 0), else each row's groups of m."""
    return t.reshape(1, -1) if m == 0 else t.reshape(-1, m)


def _sort_key(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """int64 keys whose ascending order (ties included) is the order ``torch.sort`` gives ``values``
    (``-values`` if ``descending``): integers as they are; floats by their bits, with -0.0 equal to
    0.0 and every NaN equal and after +inf, as the sort places them."""
    if not values.is_floating_point():
        values = values.to(torch.int64)
        return -values if descending else values
    x = values.to(torch.float64)
    x = (-x if descending else x) + 0.0  # -0.0 + 0.0 = 0.0
    bits = x.view(torch.int64)
    # Negative floats order in reverse by their bits: flipping all but the sign bit fixes that.
    key = bits ^ ((bits >> 63) & 0x7FFF_FFFF_FFFF_FFFF)
    return key.masked_fill_(torch.isnan(x), torch.iinfo(torch.int64).max)


def _comparable(values: torch.Tensor, descending: bool) -> tuple[torch.Tensor, bool]:
    """``values`` (and the direction) to compare with ``<``, ``==``: as they are, unless a NaN would
    break the comparisons; then their sort keys (ascending)."""
    if values.dtype == torch.bool:
        return values.to(torch.int8), descending
    if values.is_floating_point() and not all_finite(values):
        return _sort_key(values, descending), False
    return values, descending


def _first_k(primary: torch.Tensor, secondary: torch.Tensor, count: int, descending: bool = False,
             absolute: bool = False) -> torch.Tensor:
    """Bool [groups, size]: in each group, the first ``count`` positions of the lexicographic order
    (primary, secondary ascending, index ascending), primary descending if ``descending``: the first
    ``count`` of a stable sort by (primary, secondary), found by selection rather than by sorting.
    NaN comes last in either direction, as in ``torch.sort``. ``absolute``: order by |secondary|.

    One group (unstructured, any size): the count-th primary value (by counting when the values are
    integers of a small range, else ``kthvalue``); everything before it; then the same selection by
    the secondary value among the positions tied at it only; then the remaining ties in index order.
    Many groups (N:M): every pair of positions of a group is compared once; a position is chosen iff
    fewer than ``count`` positions of its group come before it.
    """
    primary, descending = _comparable(primary, descending)
    groups, size = primary.shape
    if count == 0:
        return torch.zeros(primary.shape, dtype=torch.bool, device=primary.device)
    if groups > 1:
        secondary, _ = _comparable(secondary.abs() if absolute else secondary, False)
        return _first_k_pairwise(primary, secondary, count, descending)
    primary = primary.reshape(-1)
    kth, ahead, tied_count = _kth(primary, count, descending)
    chosen = primary > kth if descending else primary < kth
    needed = count - ahead
    if needed == tied_count:
        return (chosen | (primary == kth)).reshape(1, -1)
    where = (primary == kth).nonzero().reshape(-1)  # in index order
    candidates = secondary.reshape(-1)[where]
    if absolute:
        candidates = candidates.abs()
    candidates, _ = _comparable(candidates, False)
    kth, ahead, _ = _kth(candidates, needed, False, no_sign_bits=absolute)
    at = candidates == kth
    take = (candidates < kth) | (at & (at.cumsum(0) <= needed - ahead))  # the remaining ties by index
    return chosen.index_put_((where,), take).reshape(1, -1)


def _kth(values: torch.Tensor, k: int, descending: bool, no_sign_bits: bool = False) -> tuple[torch.Tensor, int, int]:
    """For 1-D ``values`` with no NaN and 1 <= k <= numel: the k-th value in sorted order (descending
    if ``descending``), how many come strictly before it, and how many equal it (-1: not counted).

    Integers of a small range (vote counts) are counted (bincount); float64 without sign bits (|W|,
    where even -0.0 has become 0.0) is narrowed by the upper 16 bits of its bit pattern, which then
    order as the values do, before the ``kthvalue`` on the one bucket that holds the k-th; anything
    else is ``kthvalue`` itself.
    """
    numel = values.numel()
    if not values.is_floating_point():
        low, high = (int(v) for v in torch.aminmax(values))
        if high - low < max(numel, 1 << 16):
            counts = torch.bincount((values - low if low else values), minlength=high - low + 1)
            if descending:
                counts = counts.flip(0)
            cumulative = counts.cumsum(0)
            step = int(torch.searchsorted(cumulative, k))
            ahead = int(cumulative[step - 1]) if step else 0
            kth = high - step if descending else low + step
            return values.new_tensor(kth), ahead, int(counts[step])
    elif no_sign_bits and values.dtype == torch.float64 and not descending and numel >= _RADIX_MIN:
        kth = kth_smallest_float(values, k)
        return kth, int((values < kth).sum()), -1
    kth = values.kthvalue(numel - k + 1 if descending else k).values
    return kth, int((values > kth).sum() if descending else (values < kth).sum()), -1


_RADIX_MIN = 1 << 14


def _first_k_pairwise(primary: torch.Tensor, secondary: torch.Tensor, count: int, descending: bool) -> torch.Tensor:
    """``_first_k`` for many small groups: each pair (i < j) of a group's positions compared once,
    on the transposed [size, groups] layout (contiguous columns)."""
    p, s = primary.T.contiguous(), secondary.T.contiguous()
    size = p.shape[0]
    ahead = torch.zeros(p.shape, dtype=torch.int32, device=p.device)  # positions of the group before each one
    for i in range(size):
        for j in range(i + 1, size):
            first = p[i] > p[j] if descending else p[i] < p[j]
            i_first = first | ((p[i] == p[j]) & (s[i] <= s[j]))  # a full tie goes to the lower index, i
            ahead[j] += i_first
            ahead[i] += ~i_first
    return (ahead < count).T


def _mask_by_votes(
    votes: torch.Tensor, preorder: torch.Tensor, sparsity: float, n: int, m: int
) -> torch.Tensor:
    """Keep-mask that prunes, in each group, the positions with the most votes.

    ``preorder`` ([groups, size], a permutation of each group's positions) breaks ties among equal
    votes: the earlier a position comes in it, the sooner it is pruned. The pruned positions are the
    first of the lexicographic order (votes desc, place in preorder), found by selection.
    """
    places = torch.arange(preorder.shape[1], device=preorder.device).expand_as(preorder)
    place = torch.empty_like(preorder).scatter_(1, preorder, places)
    return _keep_by_votes(votes, place, sparsity, n, m)


def _keep_by_votes(votes: torch.Tensor, secondary: torch.Tensor, sparsity: float, n: int, m: int,
                   absolute: bool = False) -> torch.Tensor:
    """Keep-mask shaped like ``votes`` that prunes the first positions of each group in the order
    (votes desc, ``secondary`` ([groups, size]) asc, or |secondary| if ``absolute``, index asc)."""
    count = n if m else num_to_prune(votes.numel(), sparsity)
    pruned = _first_k(_groups(votes, m), secondary, count, descending=True, absolute=absolute)
    return (~pruned).reshape(votes.shape)


def expand_mask(
    weight: torch.Tensor, votes: torch.Tensor, sparsity: float, n: int = 0, m: int = 0
) -> PruneResult:
    """Adaptive mask expansion: prune exactly to the target by descending votes, then smallest |W|.

    Unstructured (n = m = 0): ``num_to_prune(numel, sparsity)`` positions of the whole matrix.
    N:M: ``n`` positions in every row's consecutive group of ``m``. Remaining ties go to the lower
    index. The weight keeps its dtype; pruned positions are set to 0.
    """
    _check_pattern(weight, votes, sparsity, n, m)
    keep = _keep_by_votes(votes, _groups(weight.detach(), m), sparsity, n, m, absolute=True)
    return PruneResult.from_mask(weight, keep)


def aggregate(
    c: Contribution,
    method: str = "l0",
    expansion: bool = True,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
) -> PruneResult:
    """The global matrix from a contribution: average (``l0`` or ``fedavg``), then optional expansion.

    Without expansion the mask is what averaging leaves: kept by anyone for ``l0``, non-zero for
    ``fedavg``. The weight is float64; the caller casts it to the model's dtype.
    """
    if method == "l0":
        avg = l0_average(c)
    elif method == "fedavg":
        avg = plain_average(c)
    else:
        raise UserError(f"federation.aggregation must be one of {AGGREGATION_METHODS}, got {method!r}")
    if expansion:
        return expand_mask(avg, prune_votes(c), sparsity, n, m)
    keep = c.keep_count > 0 if method == "l0" else avg != 0
    return PruneResult(weight=avg, mask=keep)


def mask_vote(
    dense_weight: torch.Tensor,
    votes: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    generator: torch.Generator | None = None,
) -> PruneResult:
    """FedPrLLM: prune the most-voted positions of the original dense weight (no averaging).

    Unstructured compares the whole matrix ("layer comparison"); N:M each row's groups of ``m``.
    Ties among equal votes are broken uniformly at random with ``generator`` (drawn on the CPU).
    """
    _check_pattern(dense_weight, votes, sparsity, n, m)
    if m:
        groups = dense_weight.numel() // m
        preorder = torch.rand(groups, m, generator=generator).argsort(dim=1)
    else:
        preorder = torch.randperm(dense_weight.numel(), generator=generator).reshape(1, -1)
    keep = _mask_by_votes(votes, preorder.to(votes.device), sparsity, n, m)
    return PruneResult.from_mask(dense_weight, keep)


def upload_bytes(mask: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes one client sends for one pruned matrix: a bitmask plus the kept values in ``dtype``."""
    bitmask = (mask.numel() + 7) // 8
    return bitmask + int(torch.count_nonzero(mask)) * dtype.itemsize
