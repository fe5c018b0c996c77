"""What the round strategies (fedspallm, fedavg, mask_vote) share: sampled clients prune, sums are pooled.

Round t: every client prunes its sampled blocks (:func:`fedspallm.federated.client.client_round`)
and its pruned matrices are summed locally into :class:`Contribution` s (Σ M⊙W, Σ M, contributor
counts); the driver sums them over processes; every process pools them with earlier rounds' sums
(client_base dense) or replaces them (client_base global) and aggregates each pooled matrix with the
strategy's rule (:meth:`RoundStrategy.aggregate_matrix`). Blocks no client covers are handled by
``federation.uncovered`` after the last round.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedspallm.federated.aggregation import Contribution, aggregate, contribute, merge
from fedspallm.federated.client import client_round
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
from fedspallm.placement import HOST
from fedspallm.models import get_weight, prunable_modules, set_weight
from fedspallm.pruners import PruneResult, magnitude_prune


class RoundStrategy(Strategy):
    """Rounds of sampled local pruning and pooled sums; subclasses choose the upload and the rule."""

    round_based = True
    masks_only: ClassVar[bool] = False  # clients upload masks only (no weight sums)

    @classmethod
    def configure(cls, federation, num_blocks: int, seed: int) -> RoundPlan:
        plan = plan_rounds(federation, num_blocks, seed)
        check_coverage(plan, federation)
        return plan

    def __init__(self, ctx: RunContext, plan: RoundPlan | None = None) -> None:
        super().__init__(ctx, plan)
        self.dense = {name: get_weight(layer).detach().to(HOST, copy=True)  # aggregation runs on the host
                      for name, layer in prunable_modules(ctx.model).items()}
        self.dtype = next(ctx.model.parameters()).dtype
        self.windows = ctx.calibration.materialize(self.clients())
        self.outcome = FederationOutcome(global_weights={}, masks={}, uncovered=self.plan.uncovered())
        self.logs = self.outcome.rounds
        self.local: dict[str, Contribution] = {}

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
        self.outcome = outcome
        self.logs = outcome.rounds
        if on_global_model(cfg, outcome.completed_rounds) or outcome.completed_rounds == cfg.rounds:
            load_global(self.ctx.model, outcome)

    def steps(self) -> list[Step]:
        return [Step(t, f"round {t + 1}") for t in range(self.ctx.federation.rounds)]

    def begin(self, step: Step) -> None:
        if step.index > 0 and not on_global_model(self.ctx.federation, step.index):
            for name, layer in prunable_modules(self.ctx.model).items():  # back to the dense cache
                set_weight(layer, self.dense[name])

    def client_update(self, step: Step, client: int, on_block) -> int:
        t, cfg = step.index, self.ctx.federation
        # On the global model (client_base=global, refit rounds) a sampled block is still pruned afresh from the
        # dense cache (see calibration.prune_sequential).
        update = client_round(self.ctx.model, self.windows[client], self.ctx.spec, self.plan.samples[t][client], client,
                              t, masks_only=self.masks_only,
                              prune_from=self.dense if on_global_model(cfg, t) else None,
                              fixed_masks=self.outcome.masks if is_refit_round(cfg, t) else None,
                              on_block=on_block, **self.ctx.engine)
        for name, result in update.pruned.items():
            self.local[name] = contribute(self.local.get(name), result.weight.cpu(), result.mask.cpu())
        return update.upload_bytes

    def local_sums(self, step: Step) -> dict[str, dict[str, torch.Tensor]]:
        """Every matrix of the round's blocks (the same list on every rank), zeros where no local client pruned it."""
        blocks = sorted({b for sampled in self.plan.samples[step.index] for b in sampled})
        weight_sum, keep_count, contributors = {}, {}, {}
        for name, layer in prunable_modules(self.ctx.model, blocks).items():
            shape = get_weight(layer).shape
            mine = self.local.get(name)
            keep_count[name] = mine.keep_count if mine is not None else torch.zeros(shape, dtype=torch.int32)
            contributors[name] = torch.tensor([mine.contributors if mine is not None else 0], dtype=torch.int64)
            if not self.masks_only:
                weight_sum[name] = mine.weight_sum if mine is not None else torch.zeros(shape, dtype=torch.float64)
        self.local = {}
        sums = {"keep_count": keep_count, "contributors": contributors}
        return sums if self.masks_only else {"weight_sum": weight_sum, **sums}

    def aggregate(self, step: Step, sums: dict[str, dict[str, torch.Tensor]]) -> None:
        """Pool the round's sums, aggregate every pooled matrix; the model ends as the global model."""
        t, cfg, spec, outcome = step.index, self.ctx.federation, self.ctx.spec, self.outcome
        reduced = {}
        for name, keep in sums["keep_count"].items():
            weight_sum = (torch.zeros((), dtype=torch.float64).expand(keep.shape) if self.masks_only
                          else sums["weight_sum"][name])
            reduced[name] = Contribution(weight_sum, keep, int(sums["contributors"][name].item()))
        pooled = outcome.pooled
        if on_global_model(cfg, t):
            pooled.clear()  # each round replaces the blocks it covers
            pooled.update(reduced)
        else:
            for name, contribution in reduced.items():
                pooled[name] = merge(pooled[name], contribution) if name in pooled else contribution
        for name, contribution in pooled.items():
            if contribution.contributors == 0:
                continue
            result = self.aggregate_matrix(step, name, contribution)
            outcome.global_weights[name] = result.weight.to(self.dtype)
            outcome.masks[name] = result.mask
        if t == cfg.rounds - 1 and outcome.uncovered and cfg.uncovered == "magnitude":
            for name in prunable_modules(self.ctx.model, outcome.uncovered):
                result = magnitude_prune(self.dense[name], spec.sparsity, spec.n, spec.m)
                outcome.global_weights[name] = result.weight.to(self.dtype)
                outcome.masks[name] = result.mask
        load_global(self.ctx.model, outcome)
        outcome.completed_rounds = t + 1

    def aggregate_matrix(self, step: Step, name: str, pooled: Contribution) -> PruneResult:
        """The global matrix from its pooled sums: the ℓ0 or plain average, then expansion to the target."""
        spec, cfg = self.ctx.spec, self.ctx.federation
        if is_refit_round(cfg, step.index):
            # Every contributor kept exactly the global mask, so the ℓ0 average is the plain one and keeps that mask.
            return aggregate(pooled, "l0", False)
        return aggregate(pooled, self.rule(), cfg.expansion, spec.sparsity, spec.n, spec.m)

    def rule(self) -> str:
        return self.ctx.federation.aggregation

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
