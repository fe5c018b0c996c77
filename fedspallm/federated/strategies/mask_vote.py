"""``mask_vote``: FedPrLLM (Guo et al. 2025). Clients upload masks only; per matrix, the server prunes
the dense weights at the positions with the most prune votes ("layer comparison").

Ties among equal votes are broken at random, with one stream per (seed, round, matrix): matrices of
the same shape do not share a tie-break permutation.
"""

from __future__ import annotations

import hashlib

import torch

from fedspallm.federated.aggregation import Contribution, mask_vote, prune_votes
from fedspallm.federated.driver import Step
from fedspallm.federated.strategies.base import register
from fedspallm.federated.strategies.round_based import RoundStrategy
from fedspallm.pruners import PruneResult


def tie_break_generator(seed: int, round_index: int, name: str) -> torch.Generator:
    """A generator of its own for one matrix in one round, derived from the run's seed."""
    digest = hashlib.blake2b(f"fedspallm/mask_vote/{seed}/{round_index}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@register
class MaskVote(RoundStrategy):
    name = "mask_vote"
    help = "FedPrLLM, clients upload masks only and the dense weights are pruned where most clients voted to prune"
    masks_only = True
    uploads_values = False

    @classmethod
    def aggregation_rule(cls, federation) -> None:
        return None

    def aggregate_matrix(self, step: Step, name: str, pooled: Contribution) -> PruneResult:
        spec = self.ctx.spec
        generator = tie_break_generator(self.ctx.seed, step.index, name)
        return mask_vote(self.dense[name], prune_votes(pooled), spec.sparsity, spec.n, spec.m, generator)
