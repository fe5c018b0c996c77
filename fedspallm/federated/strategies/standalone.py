"""``standalone``: every client prunes the whole model alone on its own windows (FedPrLLM's "local-only").

Each client's model is evaluated in its own process and the perplexities are summed over processes
(each client's row is non-zero in one process only). The run reports their mean, min and max; there
is no global model to export.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from fedspallm.calibration import prune_sequential
from fedspallm.federated.driver import Step
from fedspallm.federated.strategies.base import RunContext, Strategy, register
from fedspallm.outputs import sparsity_report, zero_counts


def standalone_clients(num_clients: int, sample: int | None, seed: int) -> list[int]:
    """The clients a standalone run prunes: all of them, or ``sample`` of them drawn with the seed."""
    if sample is None or sample >= num_clients:
        return list(range(num_clients))
    return sorted(random.Random(f"fedspallm/standalone/{seed}").sample(range(num_clients), sample))


@register
class Standalone(Strategy):
    name = "standalone"
    help = "every client prunes the whole model alone (mean, min and max perplexity over clients)"
    exports_model = False

    def __init__(self, ctx: RunContext, plan: Any = None) -> None:
        super().__init__(ctx, plan)
        cfg = ctx.federation
        self.evaluated = standalone_clients(cfg.num_clients, cfg.standalone_clients, ctx.seed)
        self.windows = ctx.calibration.materialize(self.clients())
        self.dense_state = ({k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
                            if self.windows else {})
        self.scores = torch.zeros(cfg.num_clients, len(ctx.eval_datasets), dtype=torch.float64)
        self.counts = {name: (0, numel) for name, (_, numel) in zero_counts(ctx.model).items()}
        self.eval_s = 0.0
        self.results: dict[str, Any] = {}

    def steps(self) -> list[Step]:
        return [Step(0, "standalone")]

    def clients(self) -> list[int]:
        return [c for c in super().clients() if c in self.evaluated]

    def client_update(self, step: Step, client: int, on_block) -> int:
        ctx = self.ctx
        prune_sequential(ctx.model, self.windows[client], ctx.spec, on_block=on_block,
                         uncovered=ctx.federation.uncovered, **ctx.engine)
        if client == self.evaluated[0]:
            self.counts = zero_counts(ctx.model)  # every client prunes to the same target: one report
        started = time.perf_counter()
        local = ctx.evaluate_local(ctx.model)
        self.eval_s += time.perf_counter() - started
        self.scores[client] = torch.tensor([local[name] for name in ctx.eval_datasets], dtype=torch.float64)
        ctx.model.load_state_dict(self.dense_state)
        return 0

    def local_sums(self, step: Step) -> dict[str, dict[str, torch.Tensor]]:
        zeros = torch.tensor([z for z, _ in self.counts.values()], dtype=torch.int64)
        return {"metadata": {"perplexity": self.scores, "zeros": zeros}}

    def aggregate(self, step: Step, sums) -> None:
        scores, zeros = sums["metadata"]["perplexity"], sums["metadata"]["zeros"].tolist()
        perplexity = {}
        for j, name in enumerate(self.ctx.eval_datasets):
            col = scores[self.evaluated, j].tolist()
            perplexity[name] = {"mean": sum(col) / len(col), "min": min(col), "max": max(col), "per_client": col,
                                "clients": self.evaluated}
        counts = {name: (z, numel) for z, (name, (_, numel)) in zip(zeros, self.counts.items())}
        self.results = {"perplexity": perplexity, "sparsity": sparsity_report(self.ctx.model, self.ctx.spec.sparsity,
                                                                              counts)}

    def summary(self) -> dict[str, Any]:
        return {**self.results, "eval_s": self.eval_s}
