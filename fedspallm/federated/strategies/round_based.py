"""What the round strategies (fedspallm, fedavg, mask_vote) share: sampled clients prune, sums are pooled.

Round t: every client prunes its sampled blocks (:func:`fedspallm.federated.client.client_round`);
the process keeps each pruned matrix as its upload (:class:`~fedspallm.federated.uploads.Upload`,
a packed mask and the kept values; float64 sums only where two of its clients pruned the same
matrix), on disk until its block is reduced (:class:`~fedspallm.federated.uploads.UploadStore`). Then, block by block (:meth:`RoundStrategy.parts`), the process builds that block's sums
(Σ M⊙W, Σ M, contributor counts), the driver sums them over processes, and every process pools them
with earlier rounds' sums (client_base dense) or replaces them (client_base global), aggregates the
block's matrices with the strategy's rule (:meth:`RoundStrategy.aggregate_matrix`) and writes them
into the model. A block's sums are freed once it is aggregated, unless a later round adds to them, a
round checkpoint or paired evaluation reads them: a process never holds whole-model float64 sums
otherwise. Blocks no client covers are handled by ``federation.uncovered`` after the last round.
The dense cache (:class:`~fedspallm.federated.dense.DenseSource`) exists only when the strategy reads it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedspallm.federated.aggregation import Contribution, aggregate, merge
from fedspallm.federated.client import client_round
from fedspallm.federated.dense import DenseSource
from fedspallm.federated.driver import Step
from fedspallm.federated.rounds import (
    FederationOutcome,
    RoundPlan,
    check_coverage,
    is_refit_round,
    load_global,
    on_global_model,
    paired_weights,
    plan_rounds,
)
from fedspallm.federated.strategies.base import RunContext, Strategy
from fedspallm.federated.uploads import PackedMasks, Upload, UploadStore, as_contribution
from fedspallm.models import get_weight, prunable_modules, set_weight
from fedspallm.pruners import PruneResult, magnitude_prune


class RoundStrategy(Strategy):
    """Rounds of sampled local pruning and pooled sums; subclasses choose the upload and the rule."""

    round_based = True
    uploads_values = True
    masks_only: ClassVar[bool] = False  # clients upload masks only (no weight sums)

    @classmethod
    def configure(cls, federation, num_blocks: int, seed: int) -> RoundPlan:
        plan = plan_rounds(federation, num_blocks, seed)
        check_coverage(plan, federation)
        return plan

    def __init__(self, ctx: RunContext, plan: RoundPlan | None = None) -> None:
        super().__init__(ctx, plan)
        cfg = ctx.federation
        layers = prunable_modules(ctx.model)
        self.names_of = {b: list(prunable_modules(ctx.model, [b])) for b in range(self.plan.num_blocks)}
        self.shapes = {name: get_weight(layer).shape for name, layer in layers.items()}
        self.dtype = next(ctx.model.parameters()).dtype
        # The dense cache, only where it is read (see fedspallm.federated.dense): later dense-base rounds, global-base
        # clients, mask_vote, magnitude pruning of uncovered blocks.
        reads_dense = (self.masks_only or cfg.rounds > 1 or cfg.client_base == "global"
                       or (cfg.uncovered == "magnitude" and bool(self.plan.uncovered())))
        self.dense = DenseSource(ctx.model, ctx.checkpoint) if reads_dense else None
        # Pooled sums outlive their round only where something reads them later.
        self.keep_pooled = cfg.rounds > 1 or cfg.paired_aggregation is not None
        self.windows = ctx.calibration.materialize(self.clients())
        self.outcome = FederationOutcome(global_weights={}, masks=PackedMasks(), uncovered=self.plan.uncovered())
        self.logs = self.outcome.rounds
        self.local = UploadStore(ctx.scratch)  # the uploads until their block's reduce

    def resume(self, outcome: FederationOutcome) -> None:
        """Continue after ``outcome.completed_rounds`` rounds (from a checkpoint).

        The uncovered blocks are those of this run's plan: a run resumed with more rounds may cover
        blocks the checkpointed run left uncovered, and the server's magnitude pruning of those
        (done after the checkpointed run's last round) is dropped so that they are aggregated."""
        cfg = self.ctx.federation
        if outcome.completed_rounds < cfg.rounds and cfg.uncovered == "magnitude":
            for name in prunable_modules(self.ctx.model, outcome.uncovered):
                outcome.global_weights.pop(name, None)
                outcome.masks.pop(name, None)
        outcome.uncovered = self.plan.uncovered()
        outcome.masks = PackedMasks(outcome.masks)
        self.outcome = outcome
        self.logs = outcome.rounds
        if on_global_model(cfg, outcome.completed_rounds) or outcome.completed_rounds == cfg.rounds:
            load_global(self.ctx.model, outcome)

    def steps(self) -> list[Step]:
        return [Step(t, f"round {t + 1}") for t in range(self.ctx.federation.rounds)]

    def begin(self, step: Step) -> None:
        if on_global_model(self.ctx.federation, step.index):
            self.outcome.pooled.clear()  # each round on the global model replaces the blocks it covers
        elif step.index > 0:
            for name, layer in prunable_modules(self.ctx.model).items():  # back to the dense cache
                set_weight(layer, self.dense[name])

    def client_update(self, step: Step, client: int, on_block) -> int:
        t, cfg = step.index, self.ctx.federation

        def keep(name: str, result: PruneResult) -> None:  # the upload, held in its wire form until its block's reduce
            self.local.add(name, Upload.of(result.weight, result.mask))

        # On the global model (client_base=global, refit rounds) a sampled block is still pruned afresh from the
        # dense cache (see calibration.prune_sequential).
        update = client_round(self.ctx.model, self.windows[client], self.ctx.spec, self.plan.samples[t][client], client,
                              t, keep, masks_only=self.masks_only,
                              prune_from=self.dense if on_global_model(cfg, t) else None,
                              fixed_masks=self.outcome.masks if is_refit_round(cfg, t) else None,
                              on_block=on_block, **self.ctx.engine)
        return update.upload_bytes

    def parts(self, step: Step) -> dict[str, Any]:
        """One part per block to aggregate: the round's blocks, and the blocks pooled in earlier rounds (re-aggregated
        as every round does). The same on every process."""
        blocks = {b for sampled in self.plan.samples[step.index] for b in sampled}
        pooled = set(self.outcome.pooled)
        blocks |= {b for b, names in self.names_of.items() if pooled.intersection(names)}
        return {f"block {b}": b for b in sorted(blocks)}

    def local_sums(self, step: Step, block: int) -> dict[str, dict[str, torch.Tensor]]:
        """Every matrix of ``block`` if it is one of the round's blocks (zeros where no local client pruned it),
        nothing otherwise."""
        if not any(block in sampled for sampled in self.plan.samples[step.index]):
            return {}
        weight_sum, keep_count, contributors = {}, {}, {}
        for name in self.names_of[block]:
            held = self.local.pop(name)
            mine = as_contribution(held) if held is not None else None
            shape = self.shapes[name]
            keep_count[name] = mine.keep_count if mine is not None else torch.zeros(shape, dtype=torch.int32)
            contributors[name] = torch.tensor([mine.contributors if mine is not None else 0], dtype=torch.int64)
            if not self.masks_only:
                weight_sum[name] = mine.weight_sum if mine is not None else torch.zeros(shape, dtype=torch.float64)
        sums = {"keep_count": keep_count, "contributors": contributors}
        return sums if self.masks_only else {"weight_sum": weight_sum, **sums}

    def aggregate(self, step: Step, sums: dict[str, dict[str, torch.Tensor]], block: int) -> None:
        """Pool ``block``'s sums, aggregate its pooled matrices and write them into the model."""
        outcome, layers = self.outcome, prunable_modules(self.ctx.model, [block])
        pooled = outcome.pooled
        for name, keep in sums.get("keep_count", {}).items():
            weight_sum = (torch.zeros((), dtype=torch.float64).expand(keep.shape) if self.masks_only
                          else sums["weight_sum"][name])
            reduced = Contribution(weight_sum, keep, int(sums["contributors"][name].item()))
            pooled[name] = merge(pooled[name], reduced) if name in pooled else reduced
        for name in self.names_of[block]:
            contribution = pooled.get(name)
            if contribution is None or contribution.contributors == 0:
                continue
            result = self.aggregate_matrix(step, name, contribution)
            set_weight(layers[name], result.weight)
            outcome.masks[name] = result.mask
            if self.keep_pooled:
                outcome.global_weights[name] = result.weight.to(self.dtype)
            else:
                del pooled[name]  # nothing reads this block's sums again

    def finish(self, step: Step) -> None:
        """After the last round, the blocks no client covered (``federation.uncovered: magnitude``)."""
        t, cfg, spec, outcome = step.index, self.ctx.federation, self.ctx.spec, self.outcome
        if t == cfg.rounds - 1 and outcome.uncovered and cfg.uncovered == "magnitude":
            for name, layer in prunable_modules(self.ctx.model, outcome.uncovered).items():
                result = magnitude_prune(self.dense[name], spec.sparsity, spec.n, spec.m)
                set_weight(layer, result.weight)
                outcome.global_weights[name] = result.weight.to(self.dtype)
                outcome.masks[name] = result.mask
        if self.keep_pooled:
            load_global(self.ctx.model, outcome)  # blocks aggregated in earlier rounds only (client_base global)
        outcome.completed_rounds = t + 1
        if t == cfg.rounds - 1:
            self.local.close()

    def aggregate_matrix(self, step: Step, name: str, pooled: Contribution) -> PruneResult:
        """The global matrix from its pooled sums: the ℓ0 or plain average, then expansion to the target."""
        spec, cfg = self.ctx.spec, self.ctx.federation
        if is_refit_round(cfg, step.index):
            # Every contributor kept exactly the global mask, so the ℓ0 average is the plain one and keeps that mask.
            return aggregate(pooled, "l0", False)
        return aggregate(pooled, self.aggregation_rule(cfg), cfg.expansion, spec.sparsity, spec.n, spec.m)

    @classmethod
    def aggregation_rule(cls, federation) -> str | None:
        return federation.aggregation

    def paired_weights(self, method: str) -> dict[str, torch.Tensor]:
        """The same uploads aggregated by ``method`` (federation.paired_aggregation)."""
        return paired_weights(self.outcome, self.ctx.federation, self.ctx.spec, method, self.dtype)

    def summary(self) -> dict[str, Any]:
        return {
            "client_seconds_per_round": self.outcome.client_seconds_per_round,
            "collective_time_s": self.outcome.collective_time_s,
            "uncovered_blocks": self.outcome.uncovered,
            "samples": self.plan.samples,
            "blocks_per_client": self.plan.blocks_per_client,
            "budgets": self.plan.budgets,
        }
