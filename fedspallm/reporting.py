"""Progress (rank 0 only), TensorBoard scalars and images, and the closing summary table."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedspallm.outputs import fmt_bytes

_BLOCK_NAME = re.compile(r"\.(\d+)\.(.+)$")


def split_matrix_name(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj')."""
    match = _BLOCK_NAME.search(name)
    if match is None:
        raise ValueError(f"not a block matrix name: {name}")
    return int(match.group(1)), match.group(2)


class _RoundHooks:
    def __init__(self, progress: Progress | None, rounds_task: Any, blocks_task: Any) -> None:
        self._progress, self._rounds, self._blocks = progress, rounds_task, blocks_task

    def client_block(self, client: int, index: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._blocks, completed=index + 1, total=total, description=f"client {client} blocks")

    def round_done(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._rounds)


class RunReporter:
    """Rank 0 owns ``lightning_logs/version_N``; every rank may call the collective ``log_round``."""

    def __init__(self, fabric: Fabric, root_dir: str, progress: bool = True) -> None:
        self.fabric = fabric
        self.rank_zero = fabric.global_rank == 0
        self.logger: TensorBoardLogger | None = None
        self.run_dir: Path | None = None
        if self.rank_zero:
            self.logger = TensorBoardLogger(root_dir=root_dir, name="")
            self.run_dir = Path(self.logger.log_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = Console(stderr=True)
        self.show_progress = progress and self.rank_zero
        self.bytes_per_round: list[list[int]] = []  # [round][client] upload bytes
        self.client_seconds_per_round: list[list[float]] = []  # [round][client] local pruning time

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=True)

    @contextmanager
    def blocks(self, description: str, total: int) -> Iterator[Callable[[int, int], None] | None]:
        if not self.show_progress:
            yield None
            return
        with self._progress() as progress:
            task = progress.add_task(description, total=total)
            yield lambda index, _total: progress.update(task, completed=index + 1)

    @contextmanager
    def rounds(self, num_rounds: int, num_local_clients: int, num_blocks: int) -> Iterator[_RoundHooks]:
        if not self.show_progress:
            yield _RoundHooks(None, None, None)
            return
        with self._progress() as progress:
            rounds_task = progress.add_task("rounds", total=num_rounds)
            blocks_task = progress.add_task("client blocks", total=num_blocks)
            yield _RoundHooks(progress, rounds_task, blocks_task)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def log_round(self, t: int, outcome: Any, plan: Any, num_clients: int,
                  reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Collective: gathers every client's upload bytes and local time for round t, then logs on rank 0."""
        log = outcome.rounds[t]
        sent = torch.zeros(num_clients, dtype=torch.int64)
        seconds = torch.zeros(num_clients, dtype=torch.float64)
        for client, value in log.upload_bytes.items():
            sent[client] = value
        for client, value in log.client_seconds.items():
            seconds[client] = value
        sent, seconds = reduce(sent), reduce(seconds)
        self.bytes_per_round.append(sent.tolist())
        self.client_seconds_per_round.append(seconds.tolist())
        if self.logger is None:
            return
        metrics = {f"bytes/client_{c}": float(v) for c, v in enumerate(sent.tolist())}
        metrics.update({f"time/client_{c}_s": float(v) for c, v in enumerate(seconds.tolist())})
        metrics["time/round_s"] = log.wall_time_s
        metrics["time/aggregate_s"] = log.aggregate_time_s
        for c, blocks in enumerate(plan.samples[t]):
            metrics[f"blocks_pruned/client_{c}"] = float(len(blocks))
        self.logger.log_metrics(metrics, step=t)
        text = "\n".join(f"client {c}: {blocks}" for c, blocks in enumerate(plan.samples[t]))
        self.logger.experiment.add_text("sampled_blocks", text.replace("\n", "  \n"), global_step=t)
        for name, mask in outcome.masks.items():
            block, module = split_matrix_name(name)
            self.logger.experiment.add_scalar(f"sparsity_by_round/block_{block}/{module}",
                                              1.0 - mask.float().mean().item(), global_step=t)

    def log_sparsity(self, report: dict[str, Any]) -> None:
        if self.logger is None:
            return
        per_matrix = report["per_matrix"]
        for name, value in per_matrix.items():
            block, module = split_matrix_name(name)
            self.logger.experiment.add_scalar(f"sparsity/block_{block}/{module}", value, global_step=0)
        self.logger.experiment.add_scalar("sparsity/overall", report["overall"], global_step=0)
        figure = sparsity_heatmap(per_matrix)
        if figure is not None:
            self.logger.experiment.add_figure("sparsity/heatmap", figure, global_step=0)

    def summary(self, results: dict[str, Any]) -> None:
        table = Table(title=f"fedspallm: {results['strategy']} / {results['pruning']['method']}")
        for column in ("dataset", "perplexity", "sparsity", "upload / client / round", "dense model", "time"):
            table.add_column(column)
        rounds = results["bytes"]["upload_per_client_per_round"]
        per_client = [v for row in rounds for v in row]
        upload = fmt_bytes(sum(per_client) / len(per_client)) if per_client else "-"
        for name, value in results["perplexity"].items():
            shown = (f"{value['mean']:.2f} (min {value['min']:.2f}, max {value['max']:.2f})"
                     if isinstance(value, dict) else f"{value:.3f}")
            table.add_row(name, shown, f"{results['sparsity']['overall']:.4f}", upload,
                          fmt_bytes(results["bytes"]["dense_model"]), f"{results['wall_time_s']:.1f} s")
        Console().print(table)
        Console().print(f"run directory: {self.run_dir}")

    def close(self) -> None:
        if self.logger is not None:
            self.logger.finalize("success")


def sparsity_heatmap(per_matrix: dict[str, float]):
    """A block x module image of the per-matrix sparsity (None if there is nothing to draw)."""
    if not per_matrix:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = [split_matrix_name(name) + (value,) for name, value in per_matrix.items()]
    modules = list(dict.fromkeys(module for _, module, _ in cells))
    num_blocks = max(block for block, _, _ in cells) + 1
    grid = torch.full((len(modules), num_blocks), float("nan"))
    for block, module, value in cells:
        grid[modules.index(module), block] = value
    figure, axis = plt.subplots(figsize=(max(6, num_blocks * 0.3), 0.4 * len(modules) + 1.5))
    image = axis.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_yticks(range(len(modules)), modules)
    axis.set_xlabel("block")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.colorbar(image, ax=axis, label="sparsity")
    figure.tight_layout()
    return figure
