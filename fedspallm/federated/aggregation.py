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
from fedspallm.pruners.common import PruneResult, num_to_prune, validate_pattern

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


def _mask_by_votes(
    votes: torch.Tensor, preorder: torch.Tensor, sparsity: float, n: int, m: int
) -> torch.Tensor:
    """Keep-mask that prunes, in each group, the positions with the most votes.

    ``preorder`` ([groups, size], a permutation of each group's positions) breaks ties among equal
    votes: the earlier a position comes in it, the sooner it is pruned. A stable sort by descending
    votes over the preordered positions gives the lexicographic order (votes desc, preorder).
    """
    shape = votes.shape
    votes = votes.to(torch.float64 if votes.is_floating_point() else torch.int64)
    grouped = _groups(votes, m)
    count = n if m else num_to_prune(votes.numel(), sparsity)
    by_votes = torch.sort(-grouped.gather(1, preorder), dim=1, stable=True).indices
    pruned = preorder.gather(1, by_votes[:, :count])
    keep = torch.ones_like(grouped, dtype=torch.bool).scatter_(1, pruned, False)
    return keep.reshape(shape)


def expand_mask(
    weight: torch.Tensor, votes: torch.Tensor, sparsity: float, n: int = 0, m: int = 0
) -> PruneResult:
    """Adaptive mask expansion: prune exactly to the target by descending votes, then smallest |W|.

    Unstructured (n = m = 0): ``num_to_prune(numel, sparsity)`` positions of the whole matrix.
    N:M: ``n`` positions in every row's consecutive group of ``m``. Remaining ties go to the lower
    index. The weight keeps its dtype; pruned positions are set to 0.
    """
    _check_pattern(weight, votes, sparsity, n, m)
    magnitude = _groups(weight.detach().abs(), m)
    preorder = torch.sort(magnitude, dim=1, stable=True).indices
    return PruneResult.from_mask(weight, _mask_by_votes(votes, preorder, sparsity, n, m))


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
