"""The paper's claims as experiments on the embedded default model and corpus (SmolLM2-135M, Wikipedia leads).

    python experiments/run.py main             # run what is missing, then write its tables and plots
    python experiments/run.py main --table     # only rebuild the tables and plots from existing results
    python experiments/run.py seeds | ablation | clients | heterogeneity | communication | all
    python experiments/run.py main --workers 1 # one run at a time (default: 2, one thread each)
    python experiments/run.py realistic --match seed0   # only the runs whose name contains "seed0"

Every run is one ``fedspallm prune ...`` (or ``validate``) command, run in one of the worker processes,
that writes ``experiments/out/<run>/version_0/results.json`` (its console output: ``run.log`` beside it). A run whose results.json exists is not run again, so
an interrupted experiment resumes where it stopped, and experiments share runs (the ablation's
baseline is the main experiment's FedSpaLLM run). Tables go to ``experiments/results/<experiment>.md``
and plots to ``docs/plots/``, from those results.json files only.

Settings, chosen so that the main experiment fits in an hour on a 2-core CPU (``SETTINGS`` below):
32 calibration windows of 128 tokens over all clients (4,096 tokens; 8 windows, 1,024 tokens per
client with 4 clients, fewer than the 1,536 inputs of the MLP down-projection: per-client data is
scarce, as in the paper's setting of a few long samples per client on a 7B model); perplexity on 8
windows of 256 tokens of the embedded test split ("default") and of a second, out-of-domain text: the
Python language reference that ships with the interpreter (``pydoc_data.topics``), written to
``experiments/data/python-reference.txt``. Two runs go at once, each on one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
OUT = ROOT / "out"
TABLES = ROOT / "results"
PLOTS = REPO / "docs" / "plots"
SECOND_TEXT = ROOT / "data" / "python-reference.txt"
DATASETS = ("default", "experiments/data/python-reference.txt")
DATASET_NAMES = {"default": "embedded test split", "experiments/data/python-reference.txt": "Python reference"}

SETTINGS = {"nsamples": 32, "seqlen": 128, "eval_seqlen": 256, "eval_windows": 8}
COMMON = [
    "--data.nsamples", str(SETTINGS["nsamples"]), "--data.seqlen", str(SETTINGS["seqlen"]),
    "--runtime.progress", "false", "--runtime.threads", "1",
]
EVAL = ["--eval.seqlen", str(SETTINGS["eval_seqlen"]), "--eval.max_windows", str(SETTINGS["eval_windows"]),
        "--eval.datasets", "[" + ", ".join(DATASETS) + "]"]
NO_EXPORT = ["--output.save_model", "false", "--output.save_compressed", "false", "--output.checkpoint", "false"]
TARGETS = ("0.5", "0.6", "0.7", "0.8", "2:4")
FEDERATED = ("fedspallm", "fedavg", "mask_vote", "standalone")  # fedavg: the paired aggregate of the fedspallm run
RUN_COST = {"standalone": 4, "fedspallm": 2, "mask_vote": 1.5, "centralized": 1.5, "fedstats": 1.5, "dense": 0.5}  # for the order


@dataclass
class Run:
    name: str
    args: list[str]
    tags: dict[str, object] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return OUT / self.name

    def results(self) -> dict | None:
        path = self.directory / "version_0" / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None


def target_args(target: str) -> list[str]:
    return ["--pruning.pattern", target] if ":" in target else ["--pruning.sparsity", target]


def label(target: str) -> str:
    return target if ":" in target else f"{float(target):.0%}"


def as_fedprllm(strategy: str, method: str, extra: list[str] | None) -> tuple[str, list[str]]:
    """mask_vote is FedPrLLM's method: its clients run Wanda and send masks for every block."""
    if strategy == "mask_vote":
        return "wanda", ["--federation.sampling", "all", *(extra or [])]
    return method, list(extra or [])


def prune_run(strategy: str, target: str = "0.7", clients: int = 4, partition: str = "iid", seed: int = 0,
              method: str = "sparsegpt", variant: str = "", extra: list[str] | None = None, **tags) -> Run:
    """One ``prune`` run. ``variant`` names settings beyond the defaults (``extra``)."""
    method, extra = as_fedprllm(strategy, method, extra)
    if strategy == "fedspallm" and not variant:
        # The same uploads also aggregated by plain averaging: fedavg's model, without a second run.
        extra = ["--federation.paired_aggregation", "fedavg", *(extra or [])]
    name = f"{strategy}-{method}-{target.replace(':', 'of')}-k{clients}-{partition}-seed{seed}"
    name += f"-{variant}" if variant else ""
    args = ["prune", *COMMON, *EVAL, *NO_EXPORT, "--seed", str(seed), "--federation.strategy", strategy,
            "--federation.num_clients", str(clients), "--data.partition", partition, "--pruning.method", method,
            *target_args(target), *(extra or [])]
    return Run(name, args, {"strategy": strategy, "method": method, "target": target, "clients": clients,
                            "partition": partition, "seed": seed, "variant": variant, **tags})


def dense_run() -> Run:
    return Run("dense", ["validate", "--runtime.progress", "false", "--runtime.threads", "1", *EVAL],
               {"strategy": "dense"})


# ---------------------------------------------------------------------------------------------- experiments


def main_runs() -> list[Run]:
    """Dense; centralized magnitude, Wanda, SparseGPT; the four federated strategies on IID and topic."""
    runs = [dense_run()]
    for method in ("sparsegpt", "wanda", "magnitude"):
        runs += [prune_run("centralized", t, clients=1, method=method) for t in TARGETS]
    for partition in ("iid", "topic"):
        for strategy in ("fedspallm", "mask_vote", "standalone"):
            runs += [prune_run(strategy, t, partition=partition) for t in TARGETS]
    return runs


def federated_results(strategy: str, target: str, partition: str = "iid", seed: int = 0,
                      by_name: dict[str, dict | None] | None = None) -> dict | None:
    """The results of a federated cell; fedavg's come from the fedspallm run's paired aggregate."""
    run = prune_run("fedspallm" if strategy == "fedavg" else strategy, target, partition=partition, seed=seed)
    results = by_name.get(run.name) if by_name is not None else run.results()
    if strategy != "fedavg" or results is None:
        return results
    paired = results.get("paired")
    if paired is None:
        return None
    return {**results, "strategy": "fedavg", "perplexity": paired["perplexity"],
            "sparsity": {**results["sparsity"], "overall": paired["sparsity_overall"]}}


def seeds_runs() -> list[Run]:
    """FedSpaLLM (and our all-blocks + refit variant) against standalone at 70% and 80% over seeds 0-2, both partitions."""
    runs = []
    for seed in (0, 1, 2):
        for t in ("0.7", "0.8"):
            for p in ("iid", "topic"):
                runs += [prune_run("fedspallm", t, partition=p, seed=seed), prune_run("standalone", t, partition=p, seed=seed),
                         prune_run("fedspallm", t, partition=p, seed=seed, variant="refit-all", extra=REFIT_ALL)]
    return runs


REFIT_ALL = ["--federation.sampling", "all", "--federation.rounds", "2", "--federation.freeze_mask_after", "1"]
ABLATION = {
    # variant: (description, extra arguments)
    "": ("FedSpaLLM as the paper defines it: l0, expansion, systematic sampling (budget 0.5), dense base, 1 round", []),
    "no-expansion": ("expansion off", ["--federation.expansion", "false"]),
    "sampling-all": ("sampling all (every client prunes every block)", ["--federation.sampling", "all"]),
    "sampling-uniform": ("sampling uniform (independent draws; uncovered blocks pruned by magnitude)",
                         ["--federation.sampling", "uniform", "--federation.uncovered", "magnitude"]),
    "dense-2rounds": ("client_base dense, 2 rounds (pooled)", ["--federation.rounds", "2"]),
    "global-2rounds": ("client_base global, 2 rounds", ["--federation.rounds", "2", "--federation.client_base", "global"]),
    "refit": ("+ a refit round under the global mask (freeze_mask_after 1; ours, not the paper's)",
              ["--federation.rounds", "2", "--federation.freeze_mask_after", "1"]),
    "refit-all": ("sampling all + refit round (ours)", REFIT_ALL),
}


def ablation_runs() -> list[Run]:
    """Each FedSpaLLM component switched off or swapped, at 70%, 4 clients, IID, seed 0."""
    return [prune_run("fedspallm", variant=v, extra=extra, description=d) for v, (d, extra) in ABLATION.items()] + [
        prune_run("standalone"), prune_run("centralized", clients=1)]


CLIENT_COUNTS = (2, 4, 8, 16, 32)


def clients_runs() -> list[Run]:
    """2 to 32 clients sharing the same 32 windows (IID, 70%); standalone over a sample of 4 clients from 8 on.
    Then the claim grid: 70% and 80%, IID and topic, 4 and 8 clients."""
    runs = []
    for k in CLIENT_COUNTS:
        runs += [prune_run("fedspallm", clients=k), prune_run("standalone", clients=k, extra=sample_for(k, "standalone")),
                 prune_run("fedspallm", clients=k, variant="refit", extra=ABLATION["refit"][1])]
    runs += [prune_run(strategy, target, clients=k, partition=partition, extra=sample_for(k, strategy))
             for target, partition, k, strategy in CLAIM_GRID]
    return runs + [prune_run("centralized", clients=1)]


# The paper's claim as the federated issue states it: 70% and 80%, 4 and 8 clients, IID and topic.
CLAIM_CELLS = [(t, p, k) for t in ("0.7", "0.8") for p in ("iid", "topic") for k in (4, 8)]
CLAIM_GRID = [(t, p, k, s) for t, p, k in CLAIM_CELLS for s in ("fedspallm", "standalone")]


def sample_for(clients: int, strategy: str) -> list[str]:
    return ["--federation.standalone_clients", "4"] if strategy == "standalone" and clients > 4 else []


def heterogeneity_runs() -> list[Run]:
    """Uniform budgets (0.5 each) against a linear spread from 0.25 to 1.0, with 4 and 8 clients (IID, 70%)."""
    runs = []
    for k in (4, 8):
        runs += [prune_run("fedspallm", clients=k),
                 prune_run("fedspallm", clients=k, variant="linear", extra=["--federation.budgets", "linear"])]
    return runs


def communication_runs() -> list[Run]:
    """Upload per client per round at 70% (IID, 4 clients): with and without sampling, mask_vote; dense upload."""
    described = {"": "FedSpaLLM, sampling (budget 0.5: 15 of 30 blocks)",
                 "sampling-all": "FedSpaLLM without sampling (all 30 blocks)",
                 "refit": "FedSpaLLM + refit round (ours): round 1 / round 2"}
    runs = [prune_run("fedspallm", variant=v, extra=ABLATION[v][1], description=d) for v, d in described.items()]
    return runs + [prune_run("mask_vote", description="mask_vote (FedPrLLM): bitmask of all blocks")]


# ``prune`` on configs/default.yaml in one experiment worker: one process (nothing to mask), one thread.
DEFAULT_CONFIG_PRUNE = ["prune", "--config", "configs/default.yaml", "--federation.secure_aggregation", "false",
                        "--runtime.progress", "false", "--runtime.threads", "1",
                        "--eval.datasets", "[" + ", ".join(DATASETS) + "]", *NO_EXPORT]


def default_config_run(strategy: str, target: str = "0.7", partition: str = "iid", method: str = "sparsegpt",
                       variant: str = "", extra: list[str] | None = None, **tags) -> Run:
    """One ``prune`` run of ``configs/default.yaml`` itself (32 windows x 512 tokens over 4 clients; perplexity on
    32 windows x 512 tokens), changed only where named: the setting of issue 14's acceptance."""
    name = f"default-{strategy}-{method}-{target.replace(':', 'of')}-{partition}" + (f"-{variant}" if variant else "")
    args = [*DEFAULT_CONFIG_PRUNE, "--federation.strategy", strategy,
            "--data.partition", partition, "--pruning.method", method, *target_args(target), *(extra or [])]
    return Run(name, args, {"strategy": strategy, "method": method, "target": target, "clients": 4,
                            "partition": partition, "seed": 0, "variant": variant, **tags})


SAMPLING_ALL = ["--federation.sampling", "all"]
# (target, partition, method): the cells where fedstats must equal centralized on the same windows
FEDSTATS_CELLS = [("0.7", "iid", "sparsegpt"), ("0.5", "iid", "sparsegpt"), ("2:4", "iid", "sparsegpt"),
                  ("0.7", "iid", "wanda"), ("0.7", "topic", "sparsegpt")]


def fedstats_runs() -> list[Run]:
    """fedstats (every client adds statistics for every block; and with the default budget 0.5) against
    centralized on the same windows, and against FedSpaLLM and the standalone clients at 70%."""
    runs = []
    for target, partition, method in FEDSTATS_CELLS:
        runs += [default_config_run("centralized", target, partition, method),
                 default_config_run("fedstats", target, partition, method, "all", SAMPLING_ALL)]
    runs += [default_config_run("fedstats", "0.7", p) for p in ("iid", "topic")]  # budget 0.5, systematic
    return runs + [default_config_run(s, "0.7", p) for s in ("fedspallm", "standalone") for p in ("iid", "topic")]


def fedstats_table(runs: list[Run]) -> str:
    by_name = {run.name: run.results() for run in runs}

    def get(*args, **kwargs) -> dict | None:
        return by_name.get(default_config_run(*args, **kwargs).name)

    lines = ["`configs/default.yaml` (SmolLM2-135M-Instruct fp32, 32 calibration windows x 512 tokens over 4 clients, "
             "seed 0), changed only as each row says; perplexity on 32 windows x 512 tokens. Centralized prunes the "
             "union of the same 4 clients' windows. 'all': every client adds statistics for every block "
             "(`federation.sampling all`); 'budget 0.5': the default systematic sampling, each block pruned from the "
             "statistics of the 2 clients that sampled it.", ""]
    for dataset in DATASETS:
        lines += [f"**{DATASET_NAMES[dataset]}**", "",
                  "| target | partition | pruner | centralized | fedstats (all) | fedstats / centralized | "
                  "fedstats (budget 0.5) | FedSpaLLM | standalone mean [min, max] | sparsity (fedstats all) | "
                  "peak RSS MiB, fedstats (all) / centralized |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for target, partition, method in FEDSTATS_CELLS:
            central, fed = get("centralized", target, partition, method), get("fedstats", target, partition, method, "all")
            ratio = "-" if not (central and fed) else (
                "equal (every digit)" if ppl(fed, dataset) == ppl(central, dataset)
                else f"{ppl(fed, dataset) / ppl(central, dataset):.4f}")
            seventy = target == "0.7" and method == "sparsegpt"
            budget, fedspallm, alone = ((get("fedstats", target, partition), get("fedspallm", target, partition),
                                         get("standalone", target, partition)) if seventy else (None, None, None))
            sparsity = f"{fed['sparsity']['overall']:.4f}" if fed else "-"
            memory = (f"{fed['peak_rss_bytes'] / 2**20:.0f} / {central['peak_rss_bytes'] / 2**20:.0f}"
                      if central and fed and central.get("peak_rss_bytes") and fed.get("peak_rss_bytes") else "-")
            lines.append(f"| {label(target)} | {partition} | {method} | {cell(central, dataset)} | {cell(fed, dataset)} | "
                         f"{ratio} | {cell(budget, dataset)} | {cell(fedspallm, dataset)} | {cell(alone, dataset)} | "
                         f"{sparsity} | {memory} |")
        lines.append("")
    fed = get("fedstats", "0.7", "iid", "sparsegpt", "all")
    if fed and "communication" in fed:
        lines += ["Communication of the 70% IID fedstats (all) run, from its results.json:", "", "```json",
                  json.dumps(fed["communication"], indent=1)[:2000], "```", ""]
    return "\n".join(lines)


# The paper's claims at a realistic calibration budget: configs/default.yaml (512-token windows) with 16
# windows per client. A client then holds 8,192 tokens, more than 5x the 1,536 inputs of the widest
# Hessian (the MLP down-projection), so every client's H has full rank; 8 x 128 per client (the other
# experiments) is rank-deficient. SparseGPT's own calibration is 128 x 2048 tokens on 7B models; 64 x 512
# in all is what fits three seeds of five methods on this CPU.
REALISTIC_NSAMPLES = 64
REALISTIC_METHODS = ("centralized", "fedstats", "fedspallm", "mask_vote", "standalone")


def realistic_run(strategy: str, target: str, partition: str, seed: int) -> Run:
    """One run of configs/default.yaml with 16 windows x 512 tokens per client (4 clients); fedstats and
    fedspallm at the config's budget 0.5 (systematic); mask_vote is FedPrLLM's (Wanda, every block)."""
    method, extra = as_fedprllm(strategy, "sparsegpt", None)
    name = f"realistic-{strategy}-{target.replace(':', 'of')}-{partition}-seed{seed}"
    args = [*DEFAULT_CONFIG_PRUNE, "--seed", str(seed), "--data.nsamples", str(REALISTIC_NSAMPLES),
            "--federation.strategy", strategy, "--data.partition", partition, "--pruning.method", method,
            *target_args(target), *extra]
    return Run(name, args, {"strategy": strategy, "method": method, "target": target, "clients": 4,
                            "partition": partition, "seed": seed})


def realistic_runs() -> list[Run]:
    """Seed by seed, so that a session that stops early leaves whole seeds."""
    return [realistic_run(strategy, target, partition, seed) for seed in (0, 1, 2) for target in ("0.7", "0.8")
            for partition in ("iid", "topic") for strategy in REALISTIC_METHODS]


def realistic_table(runs: list[Run]) -> str:
    by_name = {run.name: run.results() for run in runs}
    lines = [f"`configs/default.yaml` (SmolLM2-135M-Instruct fp32) with {REALISTIC_NSAMPLES} calibration windows x 512 "
             f"tokens over 4 clients ({REALISTIC_NSAMPLES // 4} per client), seeds 0-2; perplexity on 32 windows x 512 "
             "tokens. Mean ± standard deviation over the seeds that ran (n). fedstats and FedSpaLLM at the config's "
             "budget 0.5 (each block from the 2 clients that sampled it); fedstats with every block sampled is "
             "centralized bit for bit (`equivalence.md`). Standalone: the mean over the 4 clients of each seed. "
             "'< standalone': seeds where the method is below that seed's standalone mean.", ""]
    for dataset in DATASETS:
        lines += [f"**{DATASET_NAMES[dataset]}**", "",
                  "| target | partition | n | " + " | ".join(REALISTIC_METHODS) + " | FedSpaLLM < standalone | "
                  "fedstats < standalone | fedstats < FedSpaLLM |", "|---|---|---|" + "---|" * (len(REALISTIC_METHODS) + 3)]
        for target in ("0.7", "0.8"):
            for partition in ("iid", "topic"):
                seeds = [{m: by_name.get(realistic_run(m, target, partition, seed).name) for m in REALISTIC_METHODS}
                         for seed in (0, 1, 2)]
                complete = [row for row in seeds if all(row.values())]
                if not complete:
                    continue
                value = [{m: ppl(row[m], dataset) for m in REALISTIC_METHODS} for row in complete]

                def wins(a: str, b: str) -> str:
                    return f"{sum(v[a] < v[b] for v in value)}/{len(value)}"

                lines.append(f"| {label(target)} | {partition} | {len(value)} | "
                             + " | ".join(spread([v[m] for v in value]) for m in REALISTIC_METHODS)
                             + f" | {wins('fedspallm', 'standalone')} | {wins('fedstats', 'standalone')} | "
                               f"{wins('fedstats', 'fedspallm')} |")
        lines.append("")
    times = [r["wall_time_s"] for r in by_name.values() if r and "wall_time_s" in r]
    if times:
        lines.append(f"{len(times)} runs, {sum(times) / 3600:.1f} h of wall time in all (one thread each, two at once).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- running


def write_second_text() -> None:
    """The Python language reference of this interpreter, as blank-line-separated paragraphs."""
    if SECOND_TEXT.is_file():
        return
    from pydoc_data.topics import topics

    SECOND_TEXT.parent.mkdir(parents=True, exist_ok=True)
    tmp = SECOND_TEXT.with_suffix(".tmp")
    tmp.write_text("\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n", encoding="utf-8")
    os.replace(tmp, SECOND_TEXT)


def execute(job: tuple[str, list[str], str]) -> str | None:
    """One run, in this worker process (imports are paid once per worker); returns an error text on failure.

    The run's own output goes to ``<run dir>/run.log``. The memory high-water mark is reset first, so
    each results.json's ``peak_rss_bytes`` is that run's own peak (Linux).
    """
    import contextlib

    from fedspallm.cli import run as fedspallm_run
    from fedspallm.runtime import reset_peak_rss

    name, args, directory = job
    shutil.rmtree(directory, ignore_errors=True)  # what an interrupted attempt left; results.json was missing
    Path(directory).mkdir(parents=True)
    started = time.perf_counter()
    print(f"[run]  {name}", flush=True)
    reset_peak_rss()
    with open(Path(directory) / "run.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            fedspallm_run([*args, "--output.dir", directory])
        except SystemExit as stop:
            if stop.code:
                return f"{name} failed (exit {stop.code}); see {Path(directory) / 'run.log'}"
        except Exception as err:  # noqa: BLE001 - report every failure, go on with the other runs
            import traceback

            traceback.print_exc()
            return f"{name} failed: {type(err).__name__}: {err}"
    print(f"[done] {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return None


def _worker_init() -> None:
    os.chdir(REPO)  # runs name the second text by its path relative to the repository


def execute_all(runs: list[Run], workers: int) -> None:
    """Every run whose results are missing, ``workers`` at a time, each worker one process on one thread."""
    import multiprocessing

    write_second_text()
    pending = list({run.name: run for run in runs if run.results() is None}.values())
    # The longest first, so that the two workers finish together.
    pending.sort(key=lambda run: -RUN_COST.get(str(run.tags.get("strategy")), 1) * int(run.tags.get("clients", 1)) ** 0.5)
    print(f"{len(pending)} of {len(runs)} runs to do, {workers} at a time", flush=True)
    if not pending:
        return
    started = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it; --runtime.threads 1 sets torch's own count
    jobs = [(run.name, run.args, str(run.directory)) for run in pending]
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with context.Pool(workers, initializer=_worker_init, maxtasksperchild=16) as pool:
        errors = [e for e in pool.imap_unordered(execute, jobs) if e]
    print(f"{len(pending) - len(errors)} runs in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if errors:
        raise SystemExit("\n".join(errors))


# ---------------------------------------------------------------------------------------------- tables


def ppl(results: dict, dataset: str = "default") -> float:
    value = results["perplexity"][dataset]
    return value["mean"] if isinstance(value, dict) else value


def cell(results: dict | None, dataset: str = "default") -> str:
    if results is None:
        return "-"
    value = results["perplexity"][dataset]
    if isinstance(value, dict):
        return f"{value['mean']:.1f} [{value['min']:.1f}, {value['max']:.1f}]"
    return f"{value:.1f}"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def per_round_upload(results: dict) -> float:
    """Mean bytes a client uploads per round (0 for runs that upload nothing)."""
    sent = [b for row in results["bytes"]["upload_per_client_per_round"] for b in row]
    return sum(sent) / len(sent) if sent else 0.0


def settings_line() -> str:
    s = SETTINGS
    return (f"SmolLM2-135M-Instruct (fp32); {s['nsamples']} calibration windows x {s['seqlen']} tokens over all "
            f"clients; perplexity on {s['eval_windows']} windows x {s['eval_seqlen']} tokens")


def main_table(runs: list[Run]) -> str:
    by_name = {run.name: run.results() for run in runs}
    dense = by_name.get("dense")
    lines = [f"{settings_line()}. Standalone: mean [min, max] over the 4 clients. fedavg: the FedSpaLLM run's "
             "client uploads aggregated by plain averaging instead (`federation.paired_aggregation`), so the two "
             "rows differ only in the aggregation rule. Centralized runs see the union of the IID clients' windows. "
             "Seed 0 everywhere (the `seed` column); `seeds.md` repeats the 70% and 80% FedSpaLLM/standalone cells "
             "over seeds 0-2.", ""]
    for dataset in DATASETS:
        lines += [f"**{DATASET_NAMES[dataset]}**" + (f" (dense: {ppl(dense, dataset):.2f})" if dense else ""), "",
                  "| method | partition | seed | " + " | ".join(label(t) for t in TARGETS) + " |",
                  "|---|---|---|" + "---|" * len(TARGETS)]
        for method in ("magnitude", "wanda", "sparsegpt"):
            cells = [cell(by_name.get(prune_run("centralized", t, clients=1, method=method).name), dataset)
                     for t in TARGETS]
            lines.append(f"| {method} (centralized) | all data | 0 | " + " | ".join(cells) + " |")
        for partition in ("iid", "topic"):
            for strategy in FEDERATED:
                cells = [cell(federated_results(strategy, t, partition, by_name=by_name), dataset) for t in TARGETS]
                name = {"mask_vote": "mask_vote (FedPrLLM, Wanda)"}.get(strategy, strategy)
                lines.append(f"| {name} | {partition} | 0 | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def seeds_table(runs: list[Run]) -> str:
    by_name = {run.name: run.results() for run in runs}
    lines = [f"{settings_line()}; 4 clients; seeds 0, 1, 2. Mean ± standard deviation over seeds. 'wins': seeds where "
             "the method's perplexity is below that seed's standalone mean. 'all + refit' is ours, not the paper's: "
             "every client prunes every block, then a second round refits the kept weights under the global mask.", "",
             "| dataset | sparsity | partition | FedSpaLLM | standalone mean | standalone min..max (all seeds) | "
             "FedSpaLLM wins | all + refit (ours) | all + refit wins |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset in DATASETS:
        for target in ("0.7", "0.8"):
            for partition in ("iid", "topic"):
                rows = []
                for seed in (0, 1, 2):
                    fed, alone, refit = (by_name.get(prune_run(s, target, partition=partition, seed=seed, variant=v).name)
                                         for s, v in (("fedspallm", ""), ("standalone", ""), ("fedspallm", "refit-all")))
                    if fed and alone:
                        rows.append((ppl(fed, dataset), alone, ppl(refit, dataset) if refit else None))
                if not rows:
                    continue
                means = [ppl(alone, dataset) for _, alone, _ in rows]
                refits = [(r, a) for (_, _, r), a in zip(rows, means) if r is not None]
                lows = [alone["perplexity"][dataset]["min"] for _, alone, _ in rows]
                highs = [alone["perplexity"][dataset]["max"] for _, alone, _ in rows]
                lines.append(
                    f"| {DATASET_NAMES[dataset]} | {label(target)} | {partition} | {spread([f for f, _, _ in rows])} | "
                    f"{spread(means)} | {min(lows):.1f}..{max(highs):.1f} | "
                    f"{sum(f < a for (f, _, _), a in zip(rows, means))}/{len(rows)} | "
                    f"{spread([r for r, _ in refits])} | {sum(r < a for r, a in refits)}/{len(refits)} |")
    return "\n".join(lines) + "\n"


def ablation_table(runs: list[Run]) -> str:
    lines = [f"{settings_line()}; 70%, 4 clients, IID, seed 0.", "",
             "| variant | default | Python reference | achieved sparsity | upload / client / round | rounds |",
             "|---|---|---|---|---|---|"]
    rows = []
    for run in runs:
        results = run.results()
        description = run.tags.get("description") or {"standalone": "standalone (mean over clients)",
                                                       "centralized": "centralized SparseGPT (all data)"}[run.tags["strategy"]]
        rows.append((description, results))
        if run.tags["strategy"] == "fedspallm" and not run.tags["variant"]:
            rows.append(("l0 off: the same uploads averaged with zeros (fedavg), then expansion",
                         federated_results("fedavg", "0.7")))
    for description, results in rows:
        if results is None:
            continue
        upload = per_round_upload(results)
        lines.append(f"| {description} | {cell(results, DATASETS[0])} | {cell(results, DATASETS[1])} | "
                     f"{results['sparsity']['overall']:.4f} | {upload / 1e6:.1f} MB | {results.get('rounds', 1)} |")
    return "\n".join(lines) + "\n"


def seventy_iid(runs: list[Run]) -> list[Run]:
    """The runs of the client-count curve (the claim grid adds 80% and topic runs)."""
    unique = {r.name: r for r in runs if r.tags.get("target") == "0.7" and r.tags.get("partition") == "iid"}
    return sorted(unique.values(), key=lambda r: int(r.tags.get("clients", 1)))


def clients_table(runs: list[Run]) -> str:
    lines = [f"{settings_line()}; the same 32 windows split IID over K clients (32/K each); 70%; seed 0. "
             "Standalone is the mean [min, max] over all clients for K <= 4 and over 4 clients drawn with the "
             "seed for K >= 8.", "",
             "| clients | windows / client | FedSpaLLM | FedSpaLLM + refit (ours) | standalone | centralized |",
             "|---|---|---|---|---|---|"]
    curve = seventy_iid(runs)
    central = next((r.results() for r in curve if r.tags["strategy"] == "centralized"), None)
    for k in CLIENT_COUNTS:
        by = {(r.tags["strategy"], r.tags["variant"]): r.results() for r in curve if r.tags.get("clients") == k}
        lines.append(f"| {k} | {SETTINGS['nsamples'] // k} | {cell(by.get(('fedspallm', '')))} | "
                     f"{cell(by.get(('fedspallm', 'refit')))} | {cell(by.get(('standalone', '')))} | {cell(central)} |")
    lines += ["", "The paper's claim cell by cell (seed 0; 4 clients: the main experiment's runs): FedSpaLLM below the "
              "standalone mean?", "",
              "| sparsity | partition | clients | FedSpaLLM | standalone | FedSpaLLM < standalone mean |",
              "|---|---|---|---|---|---|"]
    done = {(r.tags["target"], r.tags["partition"], r.tags["clients"], r.tags["strategy"]): r.results()
            for r in runs if not r.tags["variant"]}
    for target, partition, k in CLAIM_CELLS:
        fed, alone = done.get((target, partition, k, "fedspallm")), done.get((target, partition, k, "standalone"))
        verdict = "-" if fed is None or alone is None else ("yes" if ppl(fed) < ppl(alone) else "no")
        lines.append(f"| {label(target)} | {partition} | {k} | {cell(fed)} | {cell(alone)} | {verdict} |")
    return "\n".join(lines) + "\n"


def heterogeneity_table(runs: list[Run]) -> str:
    lines = [f"{settings_line()}; 70%, IID, seed 0. Per client: budget r_i, blocks pruned k_i, local pruning time "
             "(1 thread) and upload.", "",
             "| clients | budgets | perplexity | per client: r / blocks / time / upload |", "|---|---|---|---|"]
    for run in runs:
        results = run.results()
        if results is None:
            continue
        per_client = []
        for c, (r, k) in enumerate(zip(results["budgets"], results["blocks_per_client"])):
            seconds = results["client_seconds_per_round"][0][c]
            sent = results["bytes"]["upload_per_client_per_round"][0][c]
            per_client.append(f"{r:.2f} / {k} / {seconds:.0f} s / {sent / 1e6:.0f} MB")
        kind = "linear 0.25..1.0" if run.tags["variant"] == "linear" else "uniform 0.5"
        lines.append(f"| {run.tags['clients']} | {kind} | {cell(results)} | {'; '.join(per_client)} |")
    return "\n".join(lines) + "\n"


def communication_table(runs: list[Run]) -> str:
    rows = []
    dense = None
    for run in runs:
        results = run.results()
        if results is None:
            continue
        dense = results["bytes"]["dense_model"]
        name = run.tags["description"]
        per_round = [sum(row) / len(row) for row in results["bytes"]["upload_per_client_per_round"]]
        shown = " / ".join(f"{b / 1e6:.1f} MB" for b in per_round)
        ratio = " / ".join(f"{b / dense:.3f}" for b in per_round)
        rows.append(f"| {name} | {shown} | {ratio} | {cell(results)} |")
    lines = ["Bytes one client uploads per round (bitmask + fp32 kept values; values only when the server knows the "
             "mask; bitmask only for mask_vote), against a dense fp32 upload of the whole model "
             f"({dense / 1e6:.1f} MB); 70%, 4 clients, IID, seed 0." if dense else "", "",
             "| upload | per client per round | / dense model | perplexity (default) |", "|---|---|---|---|",
             *rows]
    if dense:
        lines.append(f"| dense full-model upload | {dense / 1e6:.1f} MB | 1.000 | - |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def _save(figure, name: str) -> Path:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / name
    tmp = path.with_name(f".{name}.tmp.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_main(runs: list[Run]) -> list[Path]:
    plt = _pyplot()
    by_name = {run.name: run.results() for run in runs}
    unstructured = [t for t in TARGETS if ":" not in t]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, partition in zip(axes, ("iid", "topic")):
        lines = [(f"{m} (centralized)", [prune_run("centralized", t, clients=1, method=m).name for t in unstructured])
                 for m in ("magnitude", "wanda", "sparsegpt")]
        series = [(name, [(float(t), by_name.get(n)) for t, n in zip(unstructured, names)]) for name, names in lines]
        series += [(s, [(float(t), federated_results(s, t, partition, by_name=by_name)) for t in unstructured])
                   for s in FEDERATED]
        for name, cells in series:
            points = [(x, ppl(results)) for x, results in cells if results]
            if points:
                axis.plot(*zip(*points), marker="o", label=name, linestyle="--" if "centralized" in name else "-")
        if by_name.get("dense"):
            axis.axhline(ppl(by_name["dense"]), color="grey", linestyle=":", label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("sparsity")
        axis.set_title(f"{partition} partition, 4 clients")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (embedded test split)")
    axes[1].legend(fontsize=8)
    return [_save(figure, "experiment_perplexity_vs_sparsity.png")]


def plot_clients(runs: list[Run]) -> list[Path]:
    runs = seventy_iid(runs)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for (strategy, variant), name in ((("fedspallm", ""), "FedSpaLLM"), (("fedspallm", "refit"), "FedSpaLLM + refit (ours)"),
                                      (("standalone", ""), "standalone (mean, min..max)")):
        points = [(r.tags["clients"], r.results()) for r in runs
                  if r.tags["strategy"] == strategy and r.tags["variant"] == variant and r.results()]
        if not points:
            continue
        xs = [k for k, _ in points]
        ys = [ppl(res) for _, res in points]
        if strategy == "standalone":
            low = [y - res["perplexity"]["default"]["min"] for y, (_, res) in zip(ys, points)]
            high = [res["perplexity"]["default"]["max"] - y for y, (_, res) in zip(ys, points)]
            axis.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
        else:
            axis.plot(xs, ys, marker="o", label=name)
    central = next((r.results() for r in runs if r.tags["strategy"] == "centralized" and r.results()), None)
    if central:
        axis.axhline(ppl(central), color="grey", linestyle="--", label="centralized SparseGPT")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("clients (32 windows in all)")
    axis.set_ylabel("perplexity at 70% (embedded test split)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return [_save(figure, "experiment_perplexity_vs_clients.png")]


def plot_bytes(runs: list[Run]) -> list[Path]:
    """Perplexity against upload: the communication runs and every ablation variant that uploads."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    runs = list({run.name: run for run in ablation_runs() + runs}.values())
    for run in runs:
        results = run.results()
        if results is None or run.tags["strategy"] in ("standalone", "centralized"):
            continue
        total = sum(sum(row) / len(row) for row in results["bytes"]["upload_per_client_per_round"])
        name = run.tags.get("description") or run.tags["strategy"]
        axis.scatter([total / 1e6], [ppl(results)])
        axis.annotate(name.split(":")[0][:38], (total / 1e6, ppl(results)), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")
    for strategy, style in (("standalone", ":"), ("centralized", "--")):
        results = next((r.results() for r in runs if r.tags["strategy"] == strategy and r.results()), None)
        if results is not None:
            axis.axhline(ppl(results), color="grey", linestyle=style, label=f"{strategy} (no upload)")
    axis.legend(fontsize=7, loc="upper right")
    axis.set_xlabel("upload per client over all rounds (MB)")
    axis.set_ylabel("perplexity at 70% (embedded test split)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    return [_save(figure, "experiment_perplexity_vs_bytes.png")]


EXPERIMENTS = {
    "main": (main_runs, main_table, plot_main),
    "seeds": (seeds_runs, seeds_table, None),
    "ablation": (ablation_runs, ablation_table, None),
    "clients": (clients_runs, clients_table, plot_clients),
    "heterogeneity": (heterogeneity_runs, heterogeneity_table, None),
    "communication": (communication_runs, communication_table, plot_bytes),
    "fedstats": (fedstats_runs, fedstats_table, None),
    "realistic": (realistic_runs, realistic_table, None),
}


def check_one_environment(experiment: str, runs: list[Run]) -> dict | None:
    """The one environment of every result a table reads; a table never mixes environments."""
    from fedspallm.environment import environment_difference, environment_key

    found = [(run.name, results.get("environment")) for run in runs if (results := run.results()) is not None]
    if not found:
        return None
    first_name, first = found[0]
    for name, environment in found[1:]:
        if environment_key(environment) != environment_key(first):
            raise SystemExit(f"error: {experiment}: {name} and {first_name} were measured in different environments "
                             f"({environment_difference(first, environment)}); re-run one of them "
                             f"(delete experiments/out/<run>) so that the table comes from one environment")
    return first


def report(experiment: str) -> None:
    make_runs, make_table, make_plot = EXPERIMENTS[experiment]
    runs = make_runs()
    check_one_environment(experiment, runs)
    TABLES.mkdir(parents=True, exist_ok=True)
    table = make_table(runs)
    tmp = TABLES / f".{experiment}.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, TABLES / f"{experiment}.md")
    print(table)
    if make_plot is not None:
        for path in make_plot(runs):
            print(f"plot: {path.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--table", action="store_true", help="only rebuild tables and plots from existing results")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (each on one thread)")
    parser.add_argument("--match", default="", help="run only the runs whose name contains this (e.g. seed0); the "
                                                     "tables still read every result there is")
    args = parser.parse_args()
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    if not args.table:
        runs = [run for name in names for run in EXPERIMENTS[name][0]() if args.match in run.name]
        if not runs:
            parser.error(f"--match {args.match!r}: no run of {args.experiment} has it in its name")
        execute_all(runs, args.workers)
    for name in names:
        report(name)


if __name__ == "__main__":
    main()
