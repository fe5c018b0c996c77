"""``fedstats``: clients never send weights; block by block, the pruner's statistics are summed.

Step l (one per decoder block, ``tag`` "block l"):

1. client work: every client of this process advances its own windows through block l − 1 (as
   pruned in step l − 1) and, if block l is sampled for it, collects the statistics of block l's
   projections (:meth:`SequentialCalibration.collect`: SparseGPT's Σ x xᵀ per distinct input,
   Wanda's Σ x_j²). Each client encodes each batch's statistic in fixed point and adds the integer
   words (:class:`BlockWords`); the process adds its clients' words;
2. the driver's reducer sums them over processes (kind ``hessian`` or ``sq_norms``, as float64 values
   on the encoding's grid, which add exactly) and the counts (sequences, problem flags; kind
   ``contributors``);
3. aggregate: every process decodes the same integer sums and prunes block l from them with the
   same deterministic kernel, so every process holds the same pruned block without a broadcast.

Integers add exactly in any order, so the model does not depend on how the clients are spread over
processes. ``centralized`` sums its batches the same way, batching the union client by client, so
with every block sampled by every client ``fedstats`` is the centralized model bit for bit
(:mod:`fedspallm.federated.summed_statistics`). Clients keep their hidden states across steps; a
process holds one block's statistics at a time.

Layer sampling keeps its meaning: the budgets and ``federation.sampling`` give the same plan as
``fedspallm`` (:func:`~fedspallm.federated.rounds.plan_rounds`; over several rounds a client
contributes to every block it was sampled for in any round); a client adds statistics only for its
sampled blocks but advances through every block. Blocks no client samples follow
``federation.uncovered``. ``magnitude`` reads no data: every process prunes alone and nothing is
exchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from fedspallm.calibration import (
    STATISTIC_KINDS,
    BlockStatistics,
    NumericalError,
    SequentialCalibration,
    check_prunable,
    prune_sequential,
)
from fedspallm.errors import UserError
from fedspallm.federated.aggregation import upload_bytes
from fedspallm.federated.driver import Step
from fedspallm.federated.rounds import RoundPlan
from fedspallm.federated.summed_statistics import COUNT_FIELDS, BlockWords, run_codec
from fedspallm.federated.strategies.base import RunContext, Strategy, register
from fedspallm.federated.strategies.round_based import RoundStrategy
from fedspallm.models import find_decoder_blocks, find_prunable_layers, get_weight, in_features, prunable_modules, set_weight
from fedspallm.preflight import same_on_every_rank
from fedspallm.pruners import magnitude_prune

@register
class FedStats(Strategy):
    name = "fedstats"
    help = ("clients send no weights: block by block their pruner statistics are summed in fixed point and every "
            "process prunes the block from the sum (the centralized model on the union of the data)")

    @classmethod
    def configure(cls, federation, num_blocks: int, seed: int) -> RoundPlan:
        return RoundStrategy.configure(federation, num_blocks, seed)  # fedspallm's plan and coverage rule

    def __init__(self, ctx: RunContext, plan: RoundPlan | None = None) -> None:
        super().__init__(ctx, plan)
        spec, cfg = ctx.spec, ctx.federation
        self.num_blocks = len(find_decoder_blocks(ctx.model))
        check_prunable(ctx.model, range(self.num_blocks), spec)
        self.kind = STATISTIC_KINDS.get(spec.method)  # None: magnitude, which reads no data
        self.uncovered = self.plan.uncovered()
        # client -> the blocks it adds statistics to (sampled in any round)
        self.sampled = [sorted({b for round_ in self.plan.samples for b in round_[c]})
                        for c in range(cfg.num_clients)]
        self.dtype = next(ctx.model.parameters()).dtype
        self.codec = run_codec(ctx.calibration, ctx.federation)
        windows = ctx.calibration.materialize(self.clients())
        for client, own in windows.items():
            if len(own) == 0:
                raise same_on_every_rank(UserError(
                    f"fedstats: client {client} has no calibration window; raise data.nsamples (every client needs "
                    "at least one) or lower federation.num_clients"))
        self.windows = windows
        self.walks: dict[int, SequentialCalibration] = {}
        if self.kind is not None:
            self.walks = {client: SequentialCalibration(ctx.model, own, spec, **ctx.engine)
                          for client, own in windows.items()}
        self.readers: dict[str, str] = {}
        self.words: dict[str, torch.Tensor] = {}  # this process's integer sums for the current block
        self.counts: dict[str, torch.Tensor] = {}
        self.flags: dict[str, torch.Tensor] = {}  # per key: [client c's statistic is not finite] * K + [out of bound]
        self.fedspallm_block_bytes: list[int] = []  # what one FedSpaLLM client would upload for each block
        self.dense_block_bytes: list[int] = []

    # -- steps --------------------------------------------------------------------------------------

    def steps(self) -> list[Step]:
        if self.kind is None:
            return [Step(0, "magnitude")]
        return [Step(block, f"block {block}") for block in range(self.num_blocks)]

    def summed(self, block: int) -> bool:
        """Whether the block's statistics are summed (else it is uncovered, or magnitude needs none)."""
        return self.kind is not None and block not in self.uncovered

    def client_update(self, step: Step, client: int, on_block) -> int:
        if self.kind is None:
            return 0
        block, walk = step.index, self.walks[client]
        if block > 0:
            walk.advance(block - 1)  # through the block as every process pruned it in the last step
        if on_block is not None:
            on_block(block, self.num_blocks)
        if not self.summed(block) or block not in self.sampled[client]:
            return 0
        own = BlockWords(self.codec)
        self.readers = walk.collect(block, on_batch=own.add).readers
        sent = 0
        for key, width in self._keys(block).items():
            flags = self.flags.setdefault(key, torch.zeros(self.ctx.federation.num_clients + 1, dtype=torch.int64))
            problem = own.problems.get(key)
            if problem is not None:  # nothing of it is sent; every process learns which client and layer failed
                flags[client if problem.startswith("is not finite") else -1] += 1
                continue
            sent += self.codec.wire_bytes(self.kind, width)
            if key not in own.words:  # no token of this client reached it (an unrouted expert): zeros
                continue
            self.words[key] = own.words[key] if key not in self.words else self.words[key].add_(own.words[key])
            count = torch.tensor([own.samples[key]], dtype=torch.int64)
            self.counts[key] = count if key not in self.counts else self.counts[key].add_(count)
        return sent

    def _keys(self, block: int) -> dict[str, int]:
        """The block's statistic keys (the same on every process, in forward order) -> input width."""
        if not self.readers:  # no client of this process sampled the block: the block's structure says
            self.readers = next(iter(self.walks.values())).readers(block)
        layers = find_prunable_layers(find_decoder_blocks(self.ctx.model)[block])  # experts are matrices, not modules
        return {key: in_features(layers[key]) for key in dict.fromkeys(self.readers.values())}

    def local_sums(self, step: Step) -> dict[str, dict[str, torch.Tensor]]:
        if not self.summed(step.index):
            return {}
        keys, clients = self._keys(step.index), self.ctx.federation.num_clients
        words, counts = {}, {}
        for key, width in keys.items():
            mine = self.words.get(key, torch.zeros(self.codec.entries(self.kind, width), dtype=torch.int64))
            words[key] = self.codec.on_grid(self.kind, mine)
            counts[f"{key}/counts"] = self.counts.get(key, torch.zeros(COUNT_FIELDS, dtype=torch.int64))
            counts[f"{key}/flags"] = self.flags.get(key, torch.zeros(clients + 1, dtype=torch.int64))
        self.words, self.counts, self.flags = {}, {}, {}
        return {self.kind: words, "contributors": counts}

    def aggregate(self, step: Step, sums: dict[str, dict[str, torch.Tensor]]) -> None:
        block, cfg, spec = step.index, self.ctx.federation, self.ctx.spec
        if self.kind is None:  # magnitude: every process prunes every block alone, from its own weights
            prune_sequential(self.ctx.model, next(iter(self.windows.values())), spec, **self.ctx.engine)
            return
        layers = prunable_modules(self.ctx.model, [block])
        if not self.summed(block):
            if cfg.uncovered == "magnitude":
                for layer in layers.values():
                    set_weight(layer, magnitude_prune(get_weight(layer), spec.sparsity, spec.n, spec.m).weight)
            self._record_bytes(layers, {})
            return
        keys, counts = self._keys(block), sums["contributors"]
        for key in keys:
            flags = counts[f"{key}/flags"].tolist()
            failed = [c for c, flag in enumerate(flags[:-1]) if flag]
            if failed:
                raise same_on_every_rank(NumericalError(
                    f"client {failed[0]}: the statistic of block {block} {key} is not finite (NaN or inf); "
                    "nothing of it was sent"))
            if flags[-1]:
                raise same_on_every_rank(UserError(
                    f"block {block} {key}: a client's statistic is outside the public fixed-point bound (a mean "
                    f"second moment beyond {self.codec.encodings[self.kind].bound:g}); nothing of it was sent; raise "
                    f"federation.secure_bounds.{self.kind}"))
        values = {key: self.codec.decode(self.kind, sums[self.kind][key], int(counts[f"{key}/counts"][0]), width)
                  for key, width in keys.items()}
        statistics = BlockStatistics(self.kind, self.readers, values)
        self.readers = {}
        walk = next(iter(self.walks.values()))  # they share the model: one prune serves every client
        results = walk.prune(block, statistics, uncovered=cfg.uncovered)
        self._record_bytes(layers, {name: result.mask for name, result in results.items()})

    def _record_bytes(self, layers: dict[str, Any], masks: dict[str, torch.Tensor]) -> None:
        """What a FedSpaLLM client that pruned this block would upload (a bitmask plus the kept values of the
        block's final masks), and a dense upload of the block."""
        self.fedspallm_block_bytes.append(sum(upload_bytes(mask, self.dtype) for mask in masks.values()))
        self.dense_block_bytes.append(sum(get_weight(layer).numel() * self.dtype.itemsize
                                          for layer in layers.values()))

    # -- results ------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        per_block = [log.upload_bytes for log in self.logs]  # [block][client], summed over processes
        clients = range(self.ctx.federation.num_clients)
        encoding = self.codec.encodings.get(self.kind or "hessian")
        if self.kind is None:
            communication: dict[str, Any] = {
                "exchanged": "nothing: magnitude pruning reads no data, every process prunes alone",
                "synchronisations": 0, "upload_per_client": [0 for _ in clients]}
        else:
            communication = {
                "exchanged": f"per block, each sampled client's {self.kind} statistics in fixed point, 8 bytes a value"
                             + ("; the upper triangle of each distinct Hessian" if self.kind == "hessian" else ""),
                "encoding": {"bound": encoding.bound, "frac_bits": encoding.frac_bits,
                             "public_tokens": self.codec.total_tokens},
                "synchronisations": sum(self.summed(b) for b in range(self.num_blocks)),
                "upload_per_client_per_block": per_block,
                "upload_per_client": [sum(row[c] for row in per_block) for c in clients],
                "fedspallm_upload_per_client": [sum(self.fedspallm_block_bytes[b] for b in self.sampled[c])
                                                for c in clients],
                "dense_upload_per_client": [sum(self.dense_block_bytes[b] for b in self.sampled[c]) for c in clients],
            }
        return {
            "communication": communication,
            "collective_time_s": sum(log.collective_time_s for log in self.logs),
            "uncovered_blocks": self.uncovered,
            "samples": self.plan.samples,
            "contributing_blocks": self.sampled,
            "blocks_per_client": self.plan.blocks_per_client,
            "budgets": self.plan.budgets,
        }
