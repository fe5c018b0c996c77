"""Rounds of federated pruning: the server's plan (budgets, layer sampling), the federation's state,
and how clients are spread over processes.

The round strategies (fedspallm, fedavg, mask_vote; :mod:`fedspallm.federated.strategies`) run on
this. Every process plays the server too. It derives the same round plan from the seed, sums its
own clients' contributions, and the driver's reducer sums them over processes; every process then
computes the same aggregate and expansion, so nothing needs a broadcast. Only pruned weights,
masks and counts cross process boundaries, never windows, activations or Hessians.

Layout independence: keep counts are integers and weight sums are float64 sums of float32 values,
so the aggregate does not depend on how clients are spread over processes (see README).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedspallm.calibration import PruneSpec
from fedspallm.config import FederationConfig
from fedspallm.errors import UserError
from fedspallm.federated.aggregation import Contribution, aggregate
from fedspallm.federated.driver import StepLog
from fedspallm.federated.sampling import (
    blocks_per_client,
    client_budgets,
    round_rng,
    sample_blocks,
    uncovered_blocks,
)
from fedspallm.models import prunable_modules, set_weight

if TYPE_CHECKING:
    from fedspallm.federated.collectives import Reducer


@dataclass(frozen=True)
class RoundPlan:
    """What the server configures: budgets and, for every round, each client's blocks."""

    budgets: list[float]
    blocks_per_client: list[int]
    samples: list[list[list[int]]]  # [round][client] -> sorted block indices
    num_blocks: int

    def uncovered(self) -> list[int]:
        covered = [sorted({b for round_ in self.samples for b in round_[c]}) for c in range(len(self.budgets))]
        return uncovered_blocks(covered, self.num_blocks)


def plan_rounds(cfg: FederationConfig, num_blocks: int, seed: int) -> RoundPlan:
    budgets = client_budgets(cfg.budgets, cfg.num_clients, cfg.budget, tuple(cfg.budget_range))
    ks = [blocks_per_client(r, num_blocks) for r in budgets]
    samples = [sample_blocks(ks, num_blocks, cfg.sampling, round_rng(seed, t)) for t in range(cfg.rounds)]
    return RoundPlan(budgets, ks, samples, num_blocks)


def check_processes(processes: int, num_clients: int, key: str = "federation.num_clients", how: str = "") -> None:
    """Every process simulates at least one client: no more processes than clients (the one place of this rule)."""
    if processes > num_clients:
        launched = f"{how}: " if how else ""
        raise UserError(f"{launched}{processes} processes but {key}={num_clients}; every process needs at least one "
                        "client: launch at most that many processes, or add clients")


def clients_of_rank(num_clients: int, world_size: int, rank: int, key: str = "federation.num_clients") -> list[int]:
    """Contiguous, balanced slices of the clients: rank r simulates clients [r*K//W, (r+1)*K//W)."""
    check_processes(world_size, num_clients, key)
    return list(range(rank * num_clients // world_size, (rank + 1) * num_clients // world_size))


@dataclass
class FederationOutcome:
    """The state of a round-based federation after ``completed_rounds`` rounds (what a checkpoint holds)."""

    global_weights: dict[str, torch.Tensor]  # module name -> aggregated pruned weight, in the model dtype
    masks: MutableMapping[str, torch.Tensor]  # packed by the round strategies (federated.uploads.PackedMasks)
    rounds: list[StepLog] = field(default_factory=list)
    uncovered: list[int] = field(default_factory=list)
    pooled: dict[str, Contribution] = field(default_factory=dict)  # the sums the next round adds to
    completed_rounds: int = 0

    @property
    def collective_time_s(self) -> float:
        return sum(log.collective_time_s for log in self.rounds)

    @property
    def upload_per_client_per_round(self) -> list[list[int]]:
        return [log.upload_bytes for log in self.rounds]

    @property
    def client_seconds_per_round(self) -> list[list[float]]:
        return [log.client_seconds for log in self.rounds]


def check_coverage(plan: RoundPlan, cfg: FederationConfig) -> list[int]:
    """The blocks no client prunes in any round; an error unless ``federation.uncovered`` handles them."""
    uncovered = plan.uncovered()
    if uncovered and cfg.uncovered == "error":
        raise UserError(
            f"blocks {uncovered} are pruned by no client in {cfg.rounds} round(s), so the target sparsity can't be "
            "reached; raise federation.budgets or federation.rounds, use federation.sampling=systematic, or set "
            "federation.uncovered to magnitude or dense"
        )
    return uncovered


def is_refit_round(cfg: FederationConfig, t: int) -> bool:
    """Round t (0-based) comes after ``freeze_mask_after`` rounds: the global mask is fixed, weights are refit."""
    return cfg.freeze_mask_after is not None and t >= cfg.freeze_mask_after


def on_global_model(cfg: FederationConfig, t: int) -> bool:
    """Whether round t's clients calibrate on the global model (else on their dense cache)."""
    return cfg.client_base == "global" or is_refit_round(cfg, t)


def paired_weights(outcome: FederationOutcome, cfg: FederationConfig, spec: PruneSpec, method: str,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pooled matrices aggregated with ``method`` instead: the same uploads under another rule."""
    return {name: aggregate(c, method, cfg.expansion, spec.sparsity, spec.n, spec.m).weight.to(dtype)
            for name, c in outcome.pooled.items() if c.contributors}


def load_global(model: nn.Module, outcome: FederationOutcome) -> None:
    layers = prunable_modules(model)
    for name, weight in outcome.global_weights.items():
        set_weight(layers[name], weight)


class ClientWindows(dict):
    """client id -> windows, with the calibration plan's interface (for runs without a data plan: tests, benches)."""

    def materialize(self, clients) -> dict[int, torch.Tensor]:
        return {c: self[c] for c in clients}

    def all_windows(self) -> torch.Tensor:
        return torch.cat([self[c] for c in sorted(self)])

    @property
    def sizes(self) -> list[int]:
        return [len(self[c]) for c in sorted(self)]

    @property
    def seqlen(self) -> int:
        return next(iter(self.values())).shape[1]


def run_federation(
    model: nn.Module,
    client_windows: dict[int, torch.Tensor],
    spec: PruneSpec,
    cfg: FederationConfig,
    plan: RoundPlan | None = None,
    reducer: Reducer | None = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    offload: bool = False,
    on_round_end: Callable[[int, FederationOutcome], None] | None = None,
    on_client_block: Callable[[int, int, int], None] | None = None,
    watch: Any = None,
    resume: FederationOutcome | None = None,
) -> FederationOutcome:
    """Run the round strategy ``cfg.strategy`` in this process (every client of ``client_windows``).

    ``model`` holds the dense weights when called and the global model when this returns.
    ``resume`` is the outcome after ``resume.completed_rounds`` rounds (from a checkpoint); the
    remaining rounds then give the same result, bit for bit, as an uninterrupted run.
    """
    from fedspallm.federated.collectives import PlainReducer
    from fedspallm.federated.driver import run_steps
    from fedspallm.federated.faults import FaultInjection
    from fedspallm.federated.strategies import RunContext, get_strategy

    cls = get_strategy(cfg.strategy)
    if not cls.round_based:
        raise UserError(f"federation.strategy={cfg.strategy!r} is not a round-based strategy")
    ctx = RunContext(model, spec, cfg, ClientWindows(client_windows), seed=seed, batch_size=batch_size, device=device,
                     offload=offload)
    if plan is not None:
        check_coverage(plan, cfg)  # as Strategy.configure would
    strategy = cls(ctx, plan)
    if resume is not None:
        strategy.resume(resume)
    if watch is None:
        from fedspallm.federated.faults import RoundWatch

        watch = RoundWatch(0, 1, cfg.num_clients, cfg.rounds, cfg.collective_timeout_s)
    run_steps(strategy, reducer or PlainReducer(), watch=watch, faults=FaultInjection.from_config(cfg),
              on_client_block=on_client_block,
              on_step_end=None if on_round_end is None else lambda step, log: on_round_end(step.index, strategy.outcome))
    return strategy.outcome
