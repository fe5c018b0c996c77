"""The loop every strategy runs in: client work, one sum per kind through the reducer, aggregate, log.

The driver owns what is common to all strategies: the order of a step, the one reducer (no
strategy, reporter or checkpoint touches a process group), the per-client upload bytes and local
times (summed over processes as ``metadata``), the per-step logs, the fault watch, and fault
injection, which wraps the client work from outside (:class:`~fedspallm.federated.faults.FaultInjection`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedspallm.federated.collectives import Reducer
    from fedspallm.federated.faults import FaultInjection
    from fedspallm.federated.strategies.base import Strategy

OnBlock = Callable[[int, int], None]  # (block index, number of blocks), after each block of a client's pass
ClientUpdate = Callable[["Step", int, "OnBlock | None"], int]


@dataclass(frozen=True)
class Step:
    index: int  # position in the plan, 0-based
    tag: str  # where in the run, e.g. "round 3" or "block 12"; binds secure-aggregation masks to their use


@dataclass
class StepLog:
    """What one step cost. Per-client figures cover every client (summed over processes)."""

    index: int
    tag: str
    upload_bytes: list[int]
    client_seconds: list[float]
    client_time_s: float  # this process's local work, all its clients
    collective_time_s: float
    aggregate_time_s: float
    wall_time_s: float


class NoWatch:
    """The fault watch of a run that has none (one process, or a strategy that is not round-based)."""

    def __enter__(self) -> NoWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    @contextmanager
    def round(self, t: int) -> Iterator[None]:
        yield

    @contextmanager
    def client(self, t: int, client: int) -> Iterator[None]:
        yield

    def arrived(self, t: int) -> None:
        return None


def run_steps(
    strategy: Strategy,
    reducer: Reducer,
    *,
    watch: Any = None,
    faults: FaultInjection | None = None,
    on_client_block: Callable[[int, int, int], None] | None = None,
    on_step_end: Callable[[Step, StepLog], None] | None = None,
) -> list[StepLog]:
    """Run the strategy's remaining steps (those after ``len(strategy.logs)``) in this process.

    ``watch`` marks progress for fault diagnosis (a RoundWatch; see :mod:`fedspallm.federated.faults`).
    ``on_client_block(client, block, total)`` follows each client's pass; ``on_step_end`` runs after
    each step's aggregate, with the step's log already in ``strategy.logs``.
    """
    num_clients = strategy.ctx.federation.num_clients
    clients = strategy.clients()
    client_update: ClientUpdate = strategy.client_update
    if faults is not None:
        client_update = faults.wrap(client_update)
    watch = watch if watch is not None else NoWatch()
    with watch:
        for step in strategy.steps()[len(strategy.logs):]:
            with watch.round(step.index):
                started = time.perf_counter()
                strategy.begin(step)
                sent = torch.zeros(num_clients, dtype=torch.int64)
                seconds = torch.zeros(num_clients, dtype=torch.float64)
                for client in clients:
                    client_started = time.perf_counter()
                    on_block = (None if on_client_block is None
                                else lambda i, total, c=client: on_client_block(c, i, total))
                    with watch.client(step.index, client):
                        sent[client] = client_update(step, client, on_block)
                    seconds[client] = time.perf_counter() - client_started
                client_time = time.perf_counter() - started

                watch.arrived(step.index)
                collective_time = aggregate_time = 0.0
                for label, part in strategy.parts(step).items():  # one part's sums held at a time
                    args = () if part is None else (part,)
                    tag = step.tag if part is None else f"{step.tag}, {label}"
                    reduce_started = time.perf_counter()
                    sums = {kind: reducer.sum(tensors, kind=kind, tag=tag)
                            for kind, tensors in strategy.local_sums(step, *args).items()}
                    aggregate_started = time.perf_counter()
                    collective_time += aggregate_started - reduce_started
                    strategy.aggregate(step, sums, *args)
                    del sums
                    aggregate_time += time.perf_counter() - aggregate_started
                finish_started = time.perf_counter()
                strategy.finish(step)
                aggregate_time += time.perf_counter() - finish_started

                figures = reducer.sum({"upload_bytes": sent, "client_seconds": seconds}, kind="metadata",
                                      tag=step.tag)
                strategy.logs.append(StepLog(step.index, step.tag, figures["upload_bytes"].tolist(),
                                             figures["client_seconds"].tolist(), client_time, collective_time,
                                             aggregate_time, time.perf_counter() - started))
                if on_step_end is not None:
                    on_step_end(step, strategy.logs[-1])
    return strategy.logs
