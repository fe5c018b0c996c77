"""Wanda (Sun et al. 2024): rank weights by |W| times the norm of their input, per output row.
No weight update."""

from __future__ import annotations

import torch

from .common import PruneResult, check_finite, check_weight, prune_lowest


def wanda_prune(
    weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float, n: int = 0, m: int = 0
) -> PruneResult:
    """Prune ``weight`` [out, in] given the mean squared input-column norms ``sq_norms`` [in]."""
    check_weight(weight, sparsity, n, m)
    if sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"sq_norms must be [{weight.shape[1]}], got {tuple(sq_norms.shape)}")
    check_finite("sq_norms", sq_norms)
    if (sq_norms < 0).any():
        raise ValueError("sq_norms: contains negative values")
    score = weight.detach().float().abs() * sq_norms.to(weight.device, torch.float32).sqrt()
    return PruneResult.from_mask(weight, prune_lowest(score, sparsity, n, m, per_row=True))
