"""``fedspallm``: the paper's method (DESIGN.md, "The method"): ℓ0-norm aggregation of the sampled
clients' pruned blocks, then adaptive mask expansion to the exact target.

``federation.aggregation``, ``expansion`` and ``sampling`` switch its components for ablations."""

from __future__ import annotations

from fedspallm.federated.strategies.base import register
from fedspallm.federated.strategies.round_based import RoundStrategy


@register
class FedSpaLLM(RoundStrategy):
    name = "fedspallm"
    help = ("the paper's method: sampled clients upload pruned blocks, which are l0-averaged "
            "(federation.aggregation) and expanded to the target mask")
