"""Pruning strategies behind one interface, and the registry of their names (see :mod:`.base`).

Importing this package registers the built-in strategies; a new strategy is one more module here,
imported below, that registers itself.
"""

from fedspallm.federated.strategies.base import (
    STRATEGIES,
    RunContext,
    Strategy,
    get_strategy,
    register,
    strategy_help,
    strategy_names,
)
from fedspallm.federated.driver import Step, StepLog
from fedspallm.federated.strategies import fedspallm, centralized, standalone, fedavg, mask_vote, fedstats  # noqa: E402,F401  registers

__all__ = ["STRATEGIES", "RunContext", "Step", "StepLog", "Strategy", "get_strategy", "register", "strategy_help",
           "strategy_names"]
