"""Progress (rank 0 only), TensorBoard scalars and images, and the closing summary table; figures in, no collectives."""

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


class _StepHooks:
    def __init__(self, progress: Progress | None, steps_task: Any, blocks_task: Any) -> None:
        self._progress, self._steps, self._blocks = progress, steps_task, blocks_task

    def client_block(self, client: int, index: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._blocks, completed=index + 1, total=total, description=f"client {client} blocks")

    def step_done(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._steps)


def progress_bar(console: Console | None = None) -> Progress:
    """The one progress display of the project (rich), on stderr, cleared when done."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console or Console(stderr=True), transient=True)


def tensorboard_logger(root_dir: str) -> TensorBoardLogger:
    """The run's logger, to hand to Fabric (``loggers=[...]``); it makes ``root_dir/version_N`` on rank 0."""
    return TensorBoardLogger(root_dir=root_dir, name="")


class RunReporter:
    """Rank 0 owns ``lightning_logs/version_N``. The reporter receives figures; it runs no collective.

    Scalars go through Fabric's loggers (``fabric.log_dict``) when Fabric was given a
    :class:`TensorBoardLogger` (see :func:`tensorboard_logger`); text, per-matrix scalars and figures
    through that logger's writer, on rank 0.
    """

    def __init__(self, fabric: Fabric, root_dir: str, progress: bool = True) -> None:
        self.fabric = fabric
        self.rank_zero = fabric.global_rank == 0
        ours = [logger for logger in fabric.loggers if isinstance(logger, TensorBoardLogger)]
        self._through_fabric = bool(ours)
        self.logger: TensorBoardLogger | None = ours[0] if ours else None
        self.run_dir: Path | None = None
        if self.rank_zero:
            if self.logger is None:
                self.logger = tensorboard_logger(root_dir)
            self.run_dir = Path(self.logger.log_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = Console(stderr=True)
        self.show_progress = progress and self.rank_zero

    def _progress(self) -> Progress:
        return progress_bar(self.console)

    @contextmanager
    def blocks(self, description: str, total: int) -> Iterator[Callable[[int, int], None] | None]:
        if not self.show_progress:
            yield None
            return
        with self._progress() as progress:
            task = progress.add_task(description, total=total)
            yield lambda index, _total: progress.update(task, completed=index + 1)

    @contextmanager
    def steps(self, label: str, num_steps: int, num_blocks: int) -> Iterator[_StepHooks]:
        """A bar over the strategy's steps and one over the current client's blocks."""
        if not self.show_progress:
            yield _StepHooks(None, None, None)
            return
        with self._progress() as progress:
            steps_task = progress.add_task(label, total=num_steps)
            blocks_task = progress.add_task("client blocks", total=num_blocks)
            yield _StepHooks(progress, steps_task, blocks_task)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._through_fabric:
            self.fabric.log_dict(metrics, step=step)
        elif self.rank_zero and self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def step_metrics(self, log: Any, label: str = "round") -> dict[str, float]:
        """A step's figures (a StepLog): every client's upload bytes and local time, the step's times."""
        metrics = {f"bytes/client_{c}": float(v) for c, v in enumerate(log.upload_bytes)}
        metrics.update({f"time/client_{c}_s": float(v) for c, v in enumerate(log.client_seconds)})
        metrics[f"time/{label}_s"] = log.wall_time_s
        metrics["time/aggregate_s"] = log.aggregate_time_s
        return metrics

    def log_step(self, log: Any) -> None:
        """Step ``log.index`` of a strategy that is not round-based (e.g. fedstats' blocks)."""
        self.log_metrics(self.step_metrics(log, "step"), step=log.index)

    def log_round(self, log: Any, samples: list[list[int]], masks: dict[str, torch.Tensor]) -> None:
        """Round ``log.index``'s figures: every client's upload bytes and local time (a StepLog), the
        blocks each client pruned, and the global masks so far."""
        t = log.index
        metrics = self.step_metrics(log)
        for c, blocks in enumerate(samples):
            metrics[f"blocks_pruned/client_{c}"] = float(len(blocks))
        self.log_metrics(metrics, step=t)
        if not self.rank_zero:
            return
        text = "\n".join(f"client {c}: {blocks}" for c, blocks in enumerate(samples))
        self.logger.experiment.add_text("sampled_blocks", text.replace("\n", "  \n"), global_step=t)
        for name, mask in masks.items():
            block, module = split_matrix_name(name)
            self.logger.experiment.add_scalar(f"sparsity_by_round/block_{block}/{module}",
                                              1.0 - mask.float().mean().item(), global_step=t)

    def log_sparsity(self, report: dict[str, Any]) -> None:
        if not self.rank_zero:
            return
        per_matrix = report["per_matrix"]
        for name, value in per_matrix.items():
            block, module = split_matrix_name(name)
            self.logger.experiment.add_scalar(f"sparsity/block_{block}/{module}", value, global_step=0)
        self.logger.experiment.add_scalar("sparsity/overall", report["overall"], global_step=0)
        figure = sparsity_heatmap(per_matrix)
        if figure is not None:
            self.logger.experiment.add_figure("sparsity/heatmap", figure, global_step=0)

    def log_communication(self, communication: dict[str, Any]) -> None:
        """Per-client totals of a strategy that reports ``communication`` (fedstats), beside the alternatives."""
        if not self.rank_zero:
            return
        writer = self.logger.experiment
        writer.add_scalar("communication/synchronisations", communication["synchronisations"], global_step=0)
        for key in ("upload_per_client", "fedspallm_upload_per_client", "dense_upload_per_client"):
            for c, value in enumerate(communication.get(key, [])):
                writer.add_scalar(f"communication/{key}/client_{c}", value, global_step=0)

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
        communication = results.get("communication")
        if communication is not None:
            Console().print(communication_line(communication, results["bytes"]["dense_model"]))
        Console().print(f"run directory: {self.run_dir}")

    def close(self) -> None:
        if self.rank_zero:
            self.logger.finalize("success")


def communication_line(communication: dict[str, Any], dense_model: int) -> str:
    """One line of what a strategy that reports ``communication`` (fedstats) sent, beside the alternatives."""
    sent = communication.get("upload_per_client", [])
    if not communication.get("synchronisations"):
        return f"communication: {communication['exchanged']}"
    mean = sum(sent) / len(sent)
    fedspallm = communication["fedspallm_upload_per_client"]
    dense = communication["dense_upload_per_client"]
    return (f"communication: {fmt_bytes(mean)} per client per run in {communication['synchronisations']} "
            f"synchronisations (one per block); for the same blocks FedSpaLLM would upload "
            f"{fmt_bytes(sum(fedspallm) / len(fedspallm))}, a dense upload {fmt_bytes(sum(dense) / len(dense))} "
            f"(whole model {fmt_bytes(dense_model)})")


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
