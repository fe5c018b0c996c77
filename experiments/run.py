"""Experiments that check the paper's claims on the embedded default model and corpus.

    python experiments/run.py claims            # run what is missing, then write the table
    python experiments/run.py claims --table    # only rebuild the table from existing results
    python experiments/run.py claims --seeds 0 1 2

Each run is one ``fedspallm prune`` process writing ``experiments/out/<experiment>/<run>/version_0``;
a run whose results.json exists is skipped, so an interrupted experiment resumes where it stopped.
Tables are written to ``experiments/results/<experiment>.md`` from those results.json files only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
TABLES = ROOT / "results"
MAIN = ROOT.parent / "fedspallm" / "main.py"

# Small enough for a 2-core CPU, large enough that methods separate: 32 calibration windows of
# 256 tokens over all clients; 16 evaluation windows of 512 tokens of the embedded test split.
COMMON = [
    "--data.nsamples", "32", "--data.seqlen", "256",
    "--eval.seqlen", "512", "--eval.max_windows", "16",
    "--output.save_model", "false", "--output.save_compressed", "false",
    "--runtime.progress", "false",
]


@dataclass
class Run:
    name: str
    args: list[str]
    tags: dict[str, object] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return OUT / self.experiment / self.name

    experiment: str = ""

    def results(self) -> dict | None:
        files = sorted(self.directory.glob("version_*/results.json"))
        return json.loads(files[-1].read_text()) if files else None


def claims_runs(seeds: list[int]) -> list[Run]:
    """FedSpaLLM against standalone in every cell; the other baselines in the 4-client cells."""
    runs = []
    cells = [(s, k, p) for k in ("4", "8") for s in ("0.7", "0.8") for p in ("iid", "topic")]
    for seed in seeds:
        for strategies in (("fedspallm", "standalone"), ("centralized", "fedavg", "mask_vote")):
            for sparsity, clients, partition in cells:
                if strategies[0] == "centralized" and (seed != seeds[0] or clients != "4"):
                    continue
                base = ["--seed", str(seed), "--pruning.sparsity", sparsity, "--federation.num_clients", clients,
                        "--data.partition", partition]
                tags = {"seed": seed, "sparsity": float(sparsity), "clients": int(clients), "partition": partition}
                for strategy in strategies:
                    # FedPrLLM's clients run Wanda; its masks on the dense weights are what it aggregates.
                    pruner = ["--pruning.method", "wanda", "--federation.sampling", "all"] if strategy == "mask_vote" else []
                    name = f"{strategy}-s{sparsity}-k{clients}-{partition}-seed{seed}"
                    runs.append(Run(name, base + ["--federation.strategy", strategy, *pruner],
                                    {**tags, "strategy": strategy}, experiment="claims"))
    return runs


def variants_runs(seeds: list[int]) -> list[Run]:
    """FedSpaLLM's choices in the 70%, 4-client, IID cell: which one closes the gap to standalone?"""
    base = ["--pruning.sparsity", "0.7", "--federation.num_clients", "4", "--data.partition", "iid"]
    options = {
        "systematic-dense-1round": [],
        "all-blocks": ["--federation.sampling", "all"],
        "global-2rounds": ["--federation.client_base", "global", "--federation.rounds", "2"],
        "all-blocks-global-2rounds": ["--federation.sampling", "all", "--federation.client_base", "global",
                                      "--federation.rounds", "2"],
    }
    return [Run(f"{name}-seed{seed}", ["--seed", str(seed), *base, *args], {"variant": name, "seed": seed},
                experiment="variants") for seed in seeds for name, args in options.items()]


def variants_table(runs: list[Run]) -> str:
    lines = ["| variant (70%, 4 clients, IID) | perplexity | upload / client / round |", "|---|---|---|"]
    for run in runs:
        results = run.results()
        if results is not None:
            sent = results["bytes"]["upload_per_client_per_round"]
            per = sum(sum(r) for r in sent) / max(1, sum(len(r) for r in sent))
            lines.append(f"| {run.tags['variant']} | {ppl(results):.1f} | {per / 1e6:.1f} MB |")
    return "\n".join(lines) + "\n"


def methods_runs(seeds: list[int]) -> list[Run]:
    """Centralized pruners against each other, and the dense model (issue: order of methods)."""
    runs = [Run(f"dense-seed{seeds[0]}", ["validate"], {"method": "dense", "setting": "dense"}, experiment="methods")]
    for seed in seeds:
        for setting in ("0.5", "0.7", "2:4"):
            for method in ("sparsegpt", "wanda", "magnitude"):
                target = ["--pruning.pattern", setting] if ":" in setting else ["--pruning.sparsity", setting]
                runs.append(Run(f"{method}-{setting.replace(':', 'of')}-seed{seed}",
                                ["--seed", str(seed), "--federation.strategy", "centralized", "--federation.num_clients", "1",
                                 "--pruning.method", method, *target],
                                {"method": method, "setting": setting, "seed": seed}, experiment="methods"))
    return runs


def methods_table(runs: list[Run]) -> str:
    rows: dict[str, dict[str, float]] = {}
    dense = None
    for run in runs:
        results = run.results()
        if results is None:
            continue
        if run.tags["method"] == "dense":
            dense = ppl(results)
            continue
        rows.setdefault(run.tags["method"], {})[run.tags["setting"]] = ppl(results)
    lines = [
        "Centralized pruning of SmolLM2-135M; perplexity on the embedded test split (16 windows x 512 tokens);\n"
        "32 calibration windows x 256 tokens, seed 0." + (f" Dense perplexity: {dense:.2f}." if dense else ""),
        "",
        "| method | 50% | 70% | 2:4 |",
        "|---|---|---|---|",
    ]
    for method in ("sparsegpt", "wanda", "magnitude"):
        if method in rows:
            cells = [f"{rows[method][s]:.2f}" if s in rows[method] else "-" for s in ("0.5", "0.7", "2:4")]
            lines.append(f"| {method} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


EXPERIMENTS = {"claims": claims_runs, "methods": methods_runs, "variants": variants_runs}


def execute(run: Run) -> None:
    if run.results() is not None:
        return
    if run.args[:1] == ["validate"]:
        command = [sys.executable, str(MAIN), "validate", "--eval.seqlen", "512", "--eval.max_windows", "16",
                   "--runtime.progress", "false", "--output_dir", str(run.directory)]
    else:
        command = [sys.executable, str(MAIN), *COMMON, *run.args, "--output.dir", str(run.directory)]
    started = time.perf_counter()
    print(f"[run] {run.name}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"{run.name} failed:\n{tail}")
    print(f"[done] {run.name} in {time.perf_counter() - started:.0f} s", flush=True)


def ppl(results: dict, dataset: str = "default") -> float:
    value = results["perplexity"][dataset]
    return value["mean"] if isinstance(value, dict) else value


def claims_table(runs: list[Run]) -> str:
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        results = run.results()
        if results is None:
            continue
        key = (run.tags["sparsity"], run.tags["clients"], run.tags["partition"])
        cells.setdefault(key, {}).setdefault(run.tags["strategy"], []).append(results)
    lines = [
        "| sparsity | clients | partition | FedSpaLLM | standalone mean [min, max] | FedSpaLLM < standalone mean | "
        "centralized | fedavg | mask_vote | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    for key in sorted(cells):
        by = cells[key]
        fed = [ppl(r) for r in by.get("fedspallm", [])]
        alone = [ppl(r) for r in by.get("standalone", [])]
        lows = [r["perplexity"]["default"]["min"] for r in by.get("standalone", [])]
        highs = [r["perplexity"]["default"]["max"] for r in by.get("standalone", [])]
        seeds = sorted({r["seed"] for rs in by.values() for r in rs})
        wins = sum(1 for f, a in zip(fed, alone) if f < a)
        verdict = f"{wins}/{min(len(fed), len(alone))}" if fed and alone else "-"
        others = [f"{ppl(by[s][0]):.1f}" if s in by else "-" for s in ("centralized", "fedavg", "mask_vote")]
        lines.append(
            f"| {key[0]:.0%} | {key[1]} | {key[2]} | {spread(fed) if fed else '-'} | "
            f"{spread(alone) if alone else '-'} [{min(lows):.1f}, {max(highs):.1f}] | {verdict} | "
            f"{' | '.join(others)} | {','.join(map(str, seeds))} |" if alone else
            f"| {key[0]:.0%} | {key[1]} | {key[2]} | {spread(fed) if fed else '-'} | - | - | {' | '.join(others)} | "
            f"{','.join(map(str, seeds))} |"
        )
    header = (
        "Perplexity on the embedded test split (16 windows x 512 tokens), SmolLM2-135M pruned with SparseGPT;\n"
        "32 calibration windows x 256 tokens over all clients; FedSpaLLM with budget 0.5 (15 of 30 blocks per\n"
        "client), systematic sampling, l0 aggregation, expansion, 1 round. Mean ± std over seeds where several ran.\n\n"
    )
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--table", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    runs = EXPERIMENTS[args.experiment](args.seeds)
    if not args.table:
        for run in runs:
            execute(run)
    TABLES.mkdir(parents=True, exist_ok=True)
    writers = {"claims": claims_table, "methods": methods_table, "variants": variants_table}
    table = writers[args.experiment](runs)
    (TABLES / f"{args.experiment}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
