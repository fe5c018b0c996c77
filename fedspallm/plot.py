"""The ``plot`` command: figures from finished runs' ``results.json``.

    fedspallm plot lightning_logs/version_* --out plots/

(a) ``perplexity_<dataset>.png``: perplexity against target sparsity, one line per method, log-scale
y, one figure per evaluation dataset. A run's method label is its strategy (``fedspallm``,
``fedavg``, ``mask_vote``, ``standalone``), or its pruner's name for ``centralized`` runs; when the
runs mix pruners, federated labels name the pruner too, and N:M runs are labelled with their
pattern. Several runs at the same point (seeds) are averaged and their range drawn as an error bar;
``standalone`` runs draw their mean over clients with the min..max range. Runs of ``fedspallm
validate`` (dense models) are drawn as dashed horizontal references.

(b) ``sparsity_<run>.png``: per-matrix sparsity of every pruned run, as a block x module heatmap
(the same picture as TensorBoard's ``sparsity/heatmap``).

Every figure is written atomically (temporary file, then rename). Matplotlib uses the Agg backend.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspallm.errors import UserError

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Run:
    """What the plots need from one run directory."""

    path: Path
    strategy: str
    method: str | None
    pattern: str
    sparsity: float
    perplexity: dict[str, Any]
    per_matrix: dict[str, float] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.method is None


def _natural_key(path: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run directories from paths and glob patterns (for shells that don't expand them), in order, once each."""
    if not patterns:
        raise UserError("plot: give at least one run directory (for example lightning_logs/version_*)")
    found: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if _GLOB_CHARS.search(pattern):
            matches = sorted(glob.glob(pattern), key=_natural_key)
            if not matches:
                raise UserError(f"plot: {pattern!r} matches no path")
            found.extend(Path(m) for m in matches)
        else:
            found.append(Path(pattern))
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in found:
        run_dir = path.parent if path.name == "results.json" else path
        key = run_dir.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(run_dir)
    return unique


def load_run(run_dir: Path) -> Run:
    """Read ``run_dir/results.json``; a missing or malformed file is a :class:`UserError`."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        hint = ""
        if run_dir.is_dir() and any(run_dir.glob("*/results.json")):
            hint = f"; its subdirectories have one: use {run_dir / 'version_*'}"
        elif not run_dir.exists():
            hint = " (no such directory)"
        raise UserError(f"plot: {run_dir} has no results.json{hint}")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"plot: {results_path} is not readable JSON ({err})") from None
    try:
        perplexity = results["perplexity"]
        if not isinstance(perplexity, dict):
            raise TypeError(f"perplexity is a {type(perplexity).__name__}, not a map from dataset to value")
        per_matrix = results.get("sparsity", {}).get("per_matrix", {})
        pruning = results.get("pruning")
        if pruning is None:  # `fedspallm validate`: a dense model
            return Run(run_dir, results.get("strategy", "dense-eval"), None, "dense", 0.0, perplexity, per_matrix)
        sparsity = pruning.get("sparsity", results.get("sparsity", {}).get("target"))
        return Run(run_dir, results["strategy"], pruning["method"], pruning.get("pattern", "unstructured"),
                   float(sparsity), perplexity, per_matrix)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"plot: {results_path} lacks the fields of a fedspallm run ({type(err).__name__}: {err})") from None


def method_label(run: Run, mixed_pruners: bool) -> str:
    """The strategy, or the pruner for centralized runs; the pruner too when runs mix pruners."""
    if run.strategy == "centralized":
        label = run.method or "centralized"
    elif mixed_pruners:
        label = f"{run.strategy} ({run.method})"
    else:
        label = run.strategy
    return label if run.pattern in ("unstructured", "dense") else f"{label} {run.pattern}"


def _value(entry: Any) -> tuple[float, float, float] | None:
    """(central, low, high) of one perplexity entry: a number, or standalone's {mean, min, max}."""
    if isinstance(entry, dict):
        mean, low, high = entry.get("mean"), entry.get("min"), entry.get("max")
    else:
        mean = low = high = entry
    try:
        mean, low, high = float(mean), float(low), float(high)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(x) and x > 0 for x in (mean, low, high)):
        return None
    return mean, low, high


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return slug or "run"


def _save(figure: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(path)


def _perplexity_figure(dataset: str, runs: list[Run], mixed_pruners: bool) -> tuple[Any | None, list[str]]:
    """The figure for one dataset (None when no run has a finite perplexity on it) and notes on skipped runs."""
    import matplotlib.pyplot as plt

    skipped: list[str] = []
    lines: dict[str, dict[float, list[tuple[float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    dense: list[tuple[str, float]] = []
    for run in runs:
        if dataset not in run.perplexity:
            continue
        value = _value(run.perplexity[dataset])
        if value is None:
            skipped.append(f"{run.path}: perplexity on {dataset} is {run.perplexity[dataset]!r}")
            continue
        if run.dense:
            dense.append((run.path.name, value[0]))
        else:
            lines[method_label(run, mixed_pruners)][run.sparsity].append(value)

    if not lines and not dense:
        return None, skipped
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for label in sorted(lines):
        points = sorted(lines[label].items())
        xs = [x for x, _ in points]
        central = [sum(v[0] for v in values) / len(values) for _, values in points]
        low = [min(v[1] for v in values) for _, values in points]
        high = [max(v[2] for v in values) for _, values in points]
        yerr = [[c - lo for c, lo in zip(central, low)], [hi - c for c, hi in zip(central, high)]]
        has_range = any(e > 0 for row in yerr for e in row)
        axis.errorbar(xs, central, yerr=yerr if has_range else None, marker="o", capsize=3, label=label)
    for name, value in dense:
        axis.axhline(value, linestyle="--", color="gray", linewidth=1, label=f"dense ({name})" if len(dense) > 1 else "dense")
    axis.set_yscale("log")
    axis.set_xlabel("target sparsity")
    axis.set_ylabel(f"perplexity ({dataset})")
    axis.set_title(f"Perplexity vs sparsity: {dataset}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure, skipped


def _run_names(runs: list[Run]) -> list[str]:
    """Unique file-name stems: the run directory's name, with its parent's when names repeat."""
    names = [_slug(run.path.name) for run in runs]
    if len(set(names)) < len(names):
        names = [_slug(f"{run.path.resolve().parent.name}_{run.path.name}") for run in runs]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def plot(runs: list[str], out: str = "plots") -> list[str]:
    """Plot perplexity vs sparsity (one PNG per eval dataset) and per-layer sparsity (one PNG per run).

    Args:
        runs: run directories (lightning_logs/version_N) holding results.json; glob patterns such as
            'lightning_logs/version_*' are expanded.
        out: directory for the PNG files (created if needed).

    Returns:
        The paths of the written PNG files (also printed, one per line).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    from fedspallm.reporting import sparsity_heatmap

    loaded = [load_run(path) for path in expand_runs(list(runs))]
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"plot: --out {out} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    written: list[str] = []
    notes: list[str] = []
    mixed_pruners = len({run.method for run in loaded if not run.dense and run.strategy != "centralized"}) > 1
    datasets = list(dict.fromkeys(name for run in loaded for name in run.perplexity))
    stems: dict[str, int] = {}
    for dataset in datasets:
        figure, skipped = _perplexity_figure(dataset, loaded, mixed_pruners)
        notes.extend(skipped)
        if figure is None:
            notes.append(f"{dataset}: no run has a finite perplexity on it; no figure")
            continue
        stem = f"perplexity_{_slug(dataset)}"
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # two dataset paths with the same slug
            stem = f"{stem}_{stems[stem]}"
        written.append(_save(figure, out_dir / f"{stem}.png"))

    for run, name in zip(loaded, _run_names(loaded)):
        if run.dense or not run.per_matrix:
            continue
        figure = sparsity_heatmap(run.per_matrix)
        label = method_label(run, mixed_pruners)
        figure.axes[0].set_title(f"{run.path.name}: {label}, target sparsity {run.sparsity:g}")
        figure.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.tight_layout()
        written.append(_save(figure, out_dir / f"sparsity_{name}.png"))

    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path in written:
        print(path)
    return written


#: The CLI takes ``runs`` as positional arguments: ``fedspallm plot RUN_DIR [RUN_DIR ...] --out plots/``.
plot.cli_positional = {"runs": "run directories holding results.json, or glob patterns such as 'lightning_logs/version_*'"}
