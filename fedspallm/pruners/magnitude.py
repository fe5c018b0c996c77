"""Magnitude pruning: one |W| ranking over the whole matrix (or per group of M for N:M)."""

from __future__ import annotations

import torch

from .common import PruneResult, check_weight, prune_lowest


def magnitude_prune(weight: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> PruneResult:
    """Prune the smallest-|W| entries of ``weight`` [out, in]."""
    check_weight(weight, sparsity, n, m)
    return PruneResult.from_mask(weight, prune_lowest(weight.detach().float().abs(), sparsity, n, m))
