"""``centralized``: one pruner on the union of every client's windows (the non-private reference).

The server is the only party: rank 0 prunes, and the other processes (data-parallel evaluation)
receive its pruned weights. Nothing is uploaded. It sums the statistics of its batches in ``fedstats``'
fixed point (:meth:`StatisticCodec.collect_summed`), batching the union client by client, so that
``fedstats`` on the same clients is this model bit for bit (:mod:`fedspallm.federated.summed_statistics`).
"""

from __future__ import annotations

from fedspallm.calibration import prune_sequential
from fedspallm.federated.collectives import broadcast_from_rank_zero
from fedspallm.federated.driver import Step
from fedspallm.federated.strategies.base import Strategy, register
from fedspallm.federated.summed_statistics import run_codec
from fedspallm.models import prunable_modules


@register
class Centralized(Strategy):
    name = "centralized"
    help = "one pruner on the union of all clients' data (the non-private reference)"
    clients_per_process = False

    def steps(self) -> list[Step]:
        return [Step(0, "centralized")]

    def clients(self) -> list[int]:
        return [0] if self.ctx.rank == 0 else []  # one party, holding every client's windows

    def client_update(self, step: Step, client: int, on_block) -> int:
        ctx = self.ctx
        codec = run_codec(ctx.calibration, ctx.federation)
        prune_sequential(ctx.model, ctx.calibration.all_windows(), ctx.spec, on_block=on_block,
                         collect=codec.collect_summed, groups=ctx.calibration.sizes,
                         uncovered=ctx.federation.uncovered, **ctx.engine)
        return 0

    def aggregate(self, step: Step, sums) -> None:
        broadcast_from_rank_zero(self.ctx.fabric, {name: layer.weight.data
                                                   for name, layer in prunable_modules(self.ctx.model).items()})
