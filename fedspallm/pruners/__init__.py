"""Pure tensor pruning kernels. Weights are [out, in]; callers transpose GPT-2's Conv1D."""

from .common import (
    PruneResult,
    accumulate_hessian,
    accumulate_sq_norms,
    all_finite,
    check_finite,
    check_weight,
    num_to_prune,
    prune_lowest,
    validate_pattern,
)
from .magnitude import magnitude_prune
from .sparsegpt import inverse_hessian_cholesky, sparsegpt_prune, sparsegpt_prune_group
from .wanda import wanda_prune

__all__ = [
    "PruneResult",
    "accumulate_hessian",
    "accumulate_sq_norms",
    "all_finite",
    "check_finite",
    "check_weight",
    "inverse_hessian_cholesky",
    "magnitude_prune",
    "num_to_prune",
    "prune_lowest",
    "sparsegpt_prune",
    "sparsegpt_prune_group",
    "validate_pattern",
    "wanda_prune",
]
