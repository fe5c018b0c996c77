"""Rounds of federated pruning: configure (sampling), local work (clients), aggregate (collectives).

Every process plays the server too. It derives the same round plan from the seed, sums its own
clients' contributions, and ``all_reduce(SUM)``s them; every process then computes the same
aggregate and expansion, so nothing needs a broadcast. Only pruned weights, masks and counts cross
process boundaries, never windows, activations or Hessians.

Layout independence: keep counts are integers and weight sums are float64 sums of float32 values,
so the aggregate does not depend on how clients are spread over processes (see README).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedspallm.calibration import PruneSpec
from fedspallm.config import FederationConfig
from fedspallm.errors import UserError
from fedspallm.federated.aggregation import Contribution, aggregate, contribute, mask_vote, merge, prune_votes
from fedspallm.federated.client import client_round
from fedspallm.federated.faults import RoundWatch, inject_fault
from fedspallm.federated.sampling import (
    blocks_per_client,
    client_budgets,
    round_rng,
    sample_blocks,
    uncovered_blocks,
)
from fedspallm.models import get_weight, prunable_modules, set_weight
from fedspallm.pruners import magnitude_prune

Reduce = Callable[[torch.Tensor], torch.Tensor]  # all_reduce(SUM) across processes; identity in one process

STRATEGIES = ("fedspallm", "fedavg", "mask_vote")


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


def clients_of_rank(num_clients: int, world_size: int, rank: int) -> list[int]:
    """Contiguous, balanced slices of the clients: rank r simulates clients [r*K//W, (r+1)*K//W)."""
    if world_size > num_clients:
        raise UserError(
            f"{world_size} processes but federation.num_clients={num_clients}: every process needs at least one "
            "client; launch fewer devices or add clients"
        )
    return list(range(rank * num_clients // world_size, (rank + 1) * num_clients // world_size))


@dataclass
class RoundLog:
    round_index: int
    samples: list[list[int]]  # client -> blocks pruned this round
    upload_bytes: dict[int, int]  # client -> bytes (this rank's clients only, before gathering)
    client_time_s: float  # this process's local work, all its clients
    aggregate_time_s: float
    wall_time_s: float
    client_seconds: dict[int, float] = field(default_factory=dict)  # client -> its local work (this rank's clients)


@dataclass
class FederationOutcome:
    global_weights: dict[str, torch.Tensor]  # module name -> aggregated pruned weight, in the model dtype
    masks: dict[str, torch.Tensor]
    rounds: list[RoundLog] = field(default_factory=list)
    uncovered: list[int] = field(default_factory=list)
    collective_time_s: float = 0.0
    pooled: dict[str, Contribution] = field(default_factory=dict)  # the sums the next round adds to
    completed_rounds: int = 0


def _reduce_contributions(
    local: dict[str, Contribution], names: dict[str, nn.Module], reduce: Reduce, masks_only: bool
) -> tuple[dict[str, Contribution], float]:
    """Sum every process's contributions for ``names`` (the same list, in the same order, on every rank)."""
    start = time.perf_counter()
    out: dict[str, Contribution] = {}
    for name, layer in names.items():
        shape = get_weight(layer).shape
        mine = local.get(name)
        keep = mine.keep_count if mine is not None else torch.zeros(shape, dtype=torch.int32)
        count = torch.tensor([mine.contributors if mine is not None else 0], dtype=torch.int64)
        keep, count = reduce(keep), reduce(count)
        if masks_only:
            weight_sum = torch.zeros((), dtype=torch.float64).expand(shape)
        else:
            weight_sum = mine.weight_sum if mine is not None else torch.zeros(shape, dtype=torch.float64)
            weight_sum = reduce(weight_sum)
        out[name] = Contribution(weight_sum=weight_sum, keep_count=keep, contributors=int(count.item()))
    return out, time.perf_counter() - start


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


def run_federation(
    model: nn.Module,
    client_windows: dict[int, torch.Tensor],
    spec: PruneSpec,
    cfg: FederationConfig,
    plan: RoundPlan,
    reduce: Reduce,
    *,
    seed: int = 0,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    offload: bool = False,
    on_round_end: Callable[[int, FederationOutcome], None] | None = None,
    on_client_block: Callable[[int, int, int], None] | None = None,
    watch: RoundWatch | None = None,
    resume: FederationOutcome | None = None,
) -> FederationOutcome:
    """Run ``cfg.rounds`` rounds for this process's clients; return the global model's pruned matrices.

    ``model`` holds the dense weights when called and the global model when this returns.
    ``resume`` is the outcome after ``resume.completed_rounds`` rounds (from a checkpoint); the
    remaining rounds then give the same result, bit for bit, as an uninterrupted run.
    ``watch`` marks progress for fault diagnosis (see :mod:`fedspallm.federated.faults`).
    """
    strategy = cfg.strategy
    if strategy not in STRATEGIES:
        raise UserError(f"federation.strategy={strategy!r} is not a round-based strategy ({', '.join(STRATEGIES)})")
    uncovered = check_coverage(plan, cfg)
    dense = {name: get_weight(layer).detach().clone() for name, layer in prunable_modules(model).items()}
    if resume is None:
        outcome = FederationOutcome(global_weights={}, masks={}, uncovered=uncovered)
    else:
        outcome = resume
        if _on_global_model(cfg, outcome.completed_rounds) or outcome.completed_rounds == cfg.rounds:
            _load_global(model, outcome)
    if watch is None:
        watch = RoundWatch(0, 1, cfg.num_clients, cfg.rounds, cfg.collective_timeout_s)
    with watch:
        for t in range(outcome.completed_rounds, cfg.rounds):
            with watch.round(t):
                _run_round(t, model, client_windows, spec, cfg, plan, reduce, dense, outcome, watch, seed=seed,
                           batch_size=batch_size, device=device, offload=offload, on_client_block=on_client_block)
                if on_round_end is not None:
                    on_round_end(t, outcome)
            if t < cfg.rounds - 1 and not _on_global_model(cfg, t + 1):
                for name, layer in prunable_modules(model).items():
                    set_weight(layer, dense[name])
    return outcome


def is_refit_round(cfg: FederationConfig, t: int) -> bool:
    """Round t (0-based) comes after ``freeze_mask_after`` rounds: the global mask is fixed, weights are refit."""
    return cfg.freeze_mask_after is not None and t >= cfg.freeze_mask_after


def _on_global_model(cfg: FederationConfig, t: int) -> bool:
    """Whether round t's clients calibrate on the global model (else on their dense cache)."""
    return cfg.client_base == "global" or is_refit_round(cfg, t)


def paired_weights(outcome: FederationOutcome, cfg: FederationConfig, spec: PruneSpec, method: str,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pooled matrices aggregated with ``method`` instead: the same uploads under another rule."""
    return {name: aggregate(c, method, cfg.expansion, spec.sparsity, spec.n, spec.m).weight.to(dtype)
            for name, c in outcome.pooled.items() if c.contributors}


def _load_global(model: nn.Module, outcome: FederationOutcome) -> None:
    layers = prunable_modules(model)
    for name, weight in outcome.global_weights.items():
        set_weight(layers[name], weight)


def _local_work(
    t: int, model: nn.Module, client_windows: dict[int, torch.Tensor], spec: PruneSpec, cfg: FederationConfig,
    samples: list[list[int]], watch: RoundWatch, masks_only: bool, on_client_block: Callable | None,
    prune_from: dict[str, torch.Tensor] | None, fixed_masks: dict[str, torch.Tensor] | None, **engine,
) -> tuple[dict[str, Contribution], dict[int, int], dict[int, float]]:
    """This process's clients prune their sampled blocks; their contributions are summed locally."""
    local: dict[str, Contribution] = {}
    sent: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for client_id in sorted(client_windows):
        fault = cfg.fail_mode if cfg.fail_client == client_id and cfg.fail_round == t + 1 else None

        def on_block(i: int, total: int, c: int = client_id, fault: str | None = fault) -> None:
            if on_client_block is not None:
                on_client_block(c, i, total)
            if fault is not None:
                inject_fault(fault, c, t)  # after the client's first block: mid-round

        started = time.perf_counter()
        with watch.client(t, client_id):
            update = client_round(model, client_windows[client_id], spec, samples[client_id], client_id, t,
                                  masks_only=masks_only, prune_from=prune_from, fixed_masks=fixed_masks,
                                  on_block=on_block, **engine)
        for name, result in update.pruned.items():
            local[name] = contribute(local.get(name), result.weight.cpu(), result.mask.cpu())
        sent[client_id] = update.upload_bytes
        seconds[client_id] = time.perf_counter() - started
    return local, sent, seconds


def _run_round(
    t: int, model: nn.Module, client_windows: dict[int, torch.Tensor], spec: PruneSpec, cfg: FederationConfig,
    plan: RoundPlan, reduce: Reduce, dense: dict[str, torch.Tensor], outcome: FederationOutcome,
    watch: RoundWatch, *, seed: int, on_client_block: Callable | None, **engine,
) -> None:
    """One round: local work, all-reduce, aggregation of everything pooled so far; the model ends global."""
    started = time.perf_counter()
    masks_only = cfg.strategy == "mask_vote"
    aggregation = "fedavg" if cfg.strategy == "fedavg" else cfg.aggregation
    dtype = next(model.parameters()).dtype
    n, m = spec.n, spec.m
    samples = plan.samples[t]
    # On the global model (client_base=global, refit rounds) a sampled block is still pruned afresh from the
    # dense cache (see calibration.prune_sequential).
    refit = is_refit_round(cfg, t)
    prune_from = dense if _on_global_model(cfg, t) else None
    fixed_masks = outcome.masks if refit else None
    local, sent, seconds = _local_work(t, model, client_windows, spec, cfg, samples, watch, masks_only, on_client_block,
                              prune_from, fixed_masks, **engine)
    client_time = time.perf_counter() - started

    round_blocks = sorted({b for blocks in samples for b in blocks})
    names = prunable_modules(model, round_blocks)
    watch.arrived(t)
    reduced, collective_time = _reduce_contributions(local, names, reduce, masks_only)
    outcome.collective_time_s += collective_time
    pooled = outcome.pooled
    if _on_global_model(cfg, t):
        pooled.clear()  # each round replaces the blocks it covers
        pooled.update(reduced)
    else:
        for name, contribution in reduced.items():
            pooled[name] = merge(pooled[name], contribution) if name in pooled else contribution

    agg_started = time.perf_counter()
    for name, contribution in pooled.items():
        if contribution.contributors == 0:
            continue
        if masks_only:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + t)
            result = mask_vote(dense[name], prune_votes(contribution), spec.sparsity, n, m, generator)
        elif refit:
            # Every contributor kept exactly the global mask, so the ℓ0 average is the plain one and keeps that mask.
            result = aggregate(contribution, "l0", False)
        else:
            result = aggregate(contribution, aggregation, cfg.expansion, spec.sparsity, n, m)
        outcome.global_weights[name] = result.weight.to(dtype)
        outcome.masks[name] = result.mask
    if t == cfg.rounds - 1 and outcome.uncovered and cfg.uncovered == "magnitude":
        for name in prunable_modules(model, outcome.uncovered):
            result = magnitude_prune(dense[name], spec.sparsity, n, m)
            outcome.global_weights[name] = result.weight.to(dtype)
            outcome.masks[name] = result.mask
    aggregate_time = time.perf_counter() - agg_started

    _load_global(model, outcome)
    outcome.rounds.append(RoundLog(t, samples, sent, client_time, aggregate_time, time.perf_counter() - started,
                                   seconds))
    outcome.completed_rounds = t + 1
