"""The strategy interface and the registry of strategy names.

A strategy is a plan of steps (rounds, or blocks, or one step), each step being

0. configure: :meth:`Strategy.begin` prepares the step on every process;
1. client work: every client of this process does its local work (:meth:`Strategy.client_update`);
2. a sum: the strategy hands the driver this process's summable share (:meth:`Strategy.local_sums`,
   named tensors per kind), and the driver sums it over processes with its one reducer;
3. aggregate: every process turns the same sums into the same result (:meth:`Strategy.aggregate`),
   deterministically, so nothing needs a broadcast.

Steps 2 and 3 may run in parts (:meth:`Strategy.parts`, e.g. one per block), so that a process
holds one part's sums at a time; :meth:`Strategy.finish` closes the step.

:meth:`Strategy.summary` gives the strategy's entries of ``results.json``. The driver
(:func:`fedspallm.federated.driver.run_steps`) owns the loop, the reducer, the timings, the fault
watch and the per-step logs. Client state may persist across steps (the strategy object lives for
the whole run), so a step can be a round or a block.

Adding a strategy is one module that subclasses :class:`Strategy` and decorates it with
:func:`register`; the registry is the one source of names for the config, preflight, ``--help``
and the README.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedspallm.calibration import PruneSpec
from fedspallm.config import FederationConfig, document_strategies
from fedspallm.federated.driver import OnBlock, Step, StepLog

STRATEGIES: dict[str, type[Strategy]] = {}

def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` selectable as ``federation.strategy: <cls.name>``."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}: a strategy needs a class attribute name that is an identifier")
    if not cls.__dict__.get("help"):
        raise TypeError(f"{cls.__name__}: a strategy needs a one-line class attribute help")
    if name in STRATEGIES and STRATEGIES[name] is not cls:
        raise ValueError(f"strategy {name!r} is registered already ({STRATEGIES[name].__module__})")
    STRATEGIES[name] = cls
    document_strategies(strategy_help())
    return cls


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def strategy_help() -> str:
    """The ``federation.strategy`` help text: every registered name and its one-line description."""
    return (f"one of {', '.join(STRATEGIES)}. "
            + "; ".join(f"{name}: {cls.help}" for name, cls in STRATEGIES.items()) + ".")


def get_strategy(name: str) -> type[Strategy]:
    from fedspallm.errors import UserError

    if name not in STRATEGIES:
        raise UserError(f"federation.strategy={name!r}: unknown strategy; registered: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


@dataclass
class RunContext:
    """What a strategy gets from the driver: the model, the data and the engine settings of this process.

    Nothing here is a process group; the strategy's sums go to the driver's reducer.
    """

    model: nn.Module
    spec: PruneSpec
    federation: FederationConfig
    calibration: Any  # a data.CalibrationPlan: ``materialize(clients)``, ``all_windows()``
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    batch_size: int = 8
    device: torch.device | str | None = None
    offload: bool = False
    checkpoint: str | None = None  # where the model was loaded from (the dense cache reads it; federated.dense)
    fabric: Any = None  # only for results that are not sums of client data (centralized's broadcast)
    eval_datasets: list[str] = field(default_factory=list)
    evaluate_local: Callable[[nn.Module], dict[str, float]] | None = None  # this process alone, no collectives
    scratch: str | None = None  # a directory this process may spool to (its uploads); None: hold them in memory

    @property
    def engine(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "device": self.device, "offload": self.offload}


class Strategy(ABC):
    """One way to prune a model with clients' data. Subclass, set ``name`` and ``help``, :func:`register`.

    Class attributes:
        round_based: rounds that may be checkpointed and resumed, evaluated between rounds, and
            failed on purpose (``federation.fail_client``).
        clients_per_process: every process simulates at least one client, so a run needs no more
            processes than clients.
        exports_model: the run ends with one global model to export.
        uploads_values: clients upload pruned values (not only masks), so refit rounds
            (``federation.freeze_mask_after``) and ``federation.paired_aggregation`` apply.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    round_based: ClassVar[bool] = False
    clients_per_process: ClassVar[bool] = True
    exports_model: ClassVar[bool] = True
    uploads_values: ClassVar[bool] = False

    @classmethod
    def aggregation_rule(cls, federation: FederationConfig) -> str | None:
        """How uploaded values are averaged (``l0`` or ``fedavg``); None if no values are uploaded."""
        return None

    @classmethod
    def configure(cls, federation: FederationConfig, num_blocks: int, seed: int) -> Any:
        """The server's plan, a pure function of the config (preflight computes it once, the run reuses it).

        Raise :class:`~fedspallm.errors.UserError` for a plan that cannot reach the target."""
        return None

    def __init__(self, ctx: RunContext, plan: Any = None) -> None:
        self.ctx = ctx
        self.plan = plan if plan is not None else self.configure(
            ctx.federation, _num_blocks(ctx.model), ctx.seed)
        self.logs: list[StepLog] = []

    # -- the interface ---------------------------------------------------------------------------

    @abstractmethod
    def steps(self) -> list[Step]:
        """Every step of the run, in order."""

    def begin(self, step: Step) -> None:
        """Configure ``step`` before any client works on it (e.g. reset the model the clients start from)."""

    def clients(self) -> list[int]:
        """This process's clients."""
        from fedspallm.federated.rounds import clients_of_rank

        return clients_of_rank(self.ctx.federation.num_clients, self.ctx.world_size, self.ctx.rank)

    def client_update(self, step: Step, client: int, on_block: OnBlock | None) -> int:
        """One client's local work in ``step``; returns the bytes it would upload. Its contribution
        stays with the strategy until :meth:`local_sums`."""
        return 0

    def parts(self, step: Step) -> dict[str, Any]:
        """The step's sums in parts (label -> part), reduced and aggregated one after another so that
        only one part's sums are held at a time, e.g. one per block. The same on every process. The
        default is one part, ``None``: :meth:`local_sums` and :meth:`aggregate` are then called without
        a part. The reduce of a part is tagged ``"<step tag>, <label>"``."""
        return {step.tag: None}

    def local_sums(self, step: Step, part: Any = None) -> dict[str, dict[str, torch.Tensor]]:
        """kind -> {name: tensor}: this process's share of the step's (part's) sums. The same kinds, names,
        shapes and dtypes on every process, in the same order (zeros where this process has nothing)."""
        return {}

    @abstractmethod
    def aggregate(self, step: Step, sums: dict[str, dict[str, torch.Tensor]], part: Any = None) -> None:
        """Turn the sums over all processes into the step's (part's) result (the same on every process)."""

    def finish(self, step: Step) -> None:
        """After the last part of ``step`` is aggregated."""

    def summary(self) -> dict[str, Any]:
        """This strategy's entries of results.json (``perplexity`` and ``sparsity`` here replace the
        driver's own evaluation; ``eval_s`` is evaluation time spent inside the steps)."""
        return {}

    # -- helpers ---------------------------------------------------------------------------------

    def upload_per_client_per_round(self) -> list[list[int]]:
        return [log.upload_bytes for log in self.logs] if self.round_based else []


def _num_blocks(model: nn.Module) -> int:
    from fedspallm.models import find_decoder_blocks

    return len(find_decoder_blocks(model))
