"""``fedavg``: plain averaging of the uploads (pruned zeros included), then the same expansion as
``fedspallm``; it isolates the effect of ℓ0-norm aggregation."""

from __future__ import annotations

from fedspallm.federated.strategies.base import register
from fedspallm.federated.strategies.round_based import RoundStrategy


@register
class FedAvg(RoundStrategy):
    name = "fedavg"
    help = "plain averaging of the pruned uploads (zeros included), then mask expansion"

    @classmethod
    def aggregation_rule(cls, federation) -> str:
        return "fedavg"
