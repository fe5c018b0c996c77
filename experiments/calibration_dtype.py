"""Issue 17's calibration-dtype decision, measured with the CLI: float32 vs bfloat16 calibration forwards.

    python experiments/calibration_dtype.py           # run what is missing (one run at a time), then the table
    python experiments/calibration_dtype.py --table   # only rebuild the table from the results.json files

Centralized SparseGPT and Wanda at 50% and 70% on the embedded default model (configs/default.yaml:
float32 weights, 32 calibration windows x 512 tokens, the union of the 4 clients' windows), each once
with ``--pruning.calibration_dtype float32`` and once with ``bfloat16``; perplexity in float32 on 32
windows x 512 tokens of the embedded test split (Wikipedia) and of the second, non-Wikipedia text the
experiments use, the Python language reference of this interpreter (``pydoc_data.topics``, written to
``experiments/data/python-reference.txt`` by ``experiments/run.py``'s ``write_second_text``). One dense
``validate`` run gives the reference perplexities.

Each run is one ``python fedspallm/main.py ...`` subprocess, one after another; its results.json and
config.yaml stay in ``experiments/results/calibration_dtype/<run>/version_0/``. The table goes to
``experiments/results/calibration_dtype.md`` with the rule of the issue: bfloat16 becomes the default
only if every (pruner, sparsity) stays within 1% of float32 calibration on both texts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))
from run import DATASET_NAMES, DATASETS, write_second_text  # noqa: E402  (experiments/run.py)

OUT = ROOT / "results" / "calibration_dtype"
TABLE = ROOT / "results" / "calibration_dtype.md"
METHODS = ("sparsegpt", "wanda")
SPARSITIES = ("0.5", "0.7")
DTYPES = ("float32", "bfloat16")
TOLERANCE = 0.01  # the 1%
REPEATS = ("sparsegpt-0.7-float32", "wanda-0.7-float32")  # the largest Δ of each pruner
EVAL = ["--eval.datasets", "[" + ", ".join(DATASETS) + "]"]  # seqlen 512, 32 windows: configs/default.yaml
QUIET = ["--runtime.progress", "false", "--output.save_model", "false", "--output.save_compressed", "false",
         "--output.checkpoint", "false"]
# One process: nothing to mask (secure aggregation needs 3+ parties), whatever configs/default.yaml says.
# The committed runs predate the switch and ran plain.
PLAIN = ["--federation.secure_aggregation", "false"]


def runs() -> dict[str, list[str]]:
    """Run name -> the CLI arguments after ``python fedspallm/main.py``."""
    out = {"dense": ["validate", *EVAL, "--runtime.progress", "false"]}
    for method in METHODS:
        for sparsity in SPARSITIES:
            for dtype in DTYPES:
                out[f"{method}-{sparsity}-{dtype}"] = [
                    "prune", "--config", "configs/default.yaml", "--federation.strategy", "centralized",
                    "--pruning.method", method, "--pruning.sparsity", sparsity, "--pruning.calibration_dtype", dtype,
                    *EVAL, *QUIET, *PLAIN]
    for name in REPEATS:  # the same command again: how far float32 calibration moves from run to run
        out[f"{name}-repeat"] = out[name]
    return out


def results(name: str) -> dict | None:
    path = OUT / name / "version_0" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def execute(name: str, args: list[str]) -> None:
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)  # what an interrupted attempt left: results.json was missing
    command = [sys.executable, "fedspallm/main.py", *args, "--output.dir", str(directory.relative_to(REPO))]
    print(f"[run]  {name}: {shlex.join(command[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    # The machine's load while the run went: results.json does not hold it, and the timings mean little without it.
    (directory / "version_0" / "load.json").write_text(json.dumps(
        {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
         "command": ["python", *command[1:]], "seconds": time.perf_counter() - started}, indent=1) + "\n")
    print(f"[done] {name} in {time.perf_counter() - started:.0f} s", flush=True)


def table() -> str:
    dense = results("dense")
    lines = ["# Calibration dtype: float32 vs bfloat16 calibration forwards (issue 17, item 2)", "",
             "Written by `python experiments/calibration_dtype.py` from the results.json files in "
             "`experiments/results/calibration_dtype/`. Centralized pruning of the embedded SmolLM2-135M "
             "(float32 weights), configs/default.yaml: 32 calibration windows x 512 tokens, seed 0; "
             "perplexity evaluated in float32 on 32 windows x 512 tokens of each text. "
             "Δ = ppl(bfloat16 calibration) / ppl(float32 calibration) - 1.", ""]
    names = [DATASET_NAMES[d] for d in DATASETS]
    if dense is not None:
        lines += ["Dense: " + ", ".join(f"{n} {dense['perplexity'][d]:.3f}" for n, d in zip(names, DATASETS)), ""]
    header = ["pruner", "sparsity"]
    for n in names:
        header += [f"{n} fp32", f"{n} bf16", f"{n} Δ"]
    header += ["prune s fp32", "prune s bf16", "load avg (fp32 / bf16 runs)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    worst, missing = 0.0, []
    for method in METHODS:
        for sparsity in SPARSITIES:
            pair = {d: results(f"{method}-{sparsity}-{d}") for d in DTYPES}
            if None in pair.values():
                missing.append(f"{method}-{sparsity}")
                continue
            fp32, bf16 = pair["float32"], pair["bfloat16"]
            assert fp32["pruning"]["calibration_dtype"] == "float32" and bf16["pruning"]["calibration_dtype"] == "bfloat16"
            assert fp32["eval"]["dtype"] == bf16["eval"]["dtype"] == "float32"
            row = [method, sparsity]
            for dataset in DATASETS:
                a, b = fp32["perplexity"][dataset], bf16["perplexity"][dataset]
                worst = max(worst, abs(b / a - 1))
                row += [f"{a:.3f}", f"{b:.3f}", f"{100 * (b / a - 1):+.2f}%"]
            loads = [json.loads((OUT / f"{method}-{sparsity}-{d}" / "version_0" / "load.json").read_text())
                     for d in DTYPES]
            row += [f"{fp32['timings']['prune_s']:.1f}", f"{bf16['timings']['prune_s']:.1f}",
                    " / ".join(f"{x['loadavg_1min_before']:.1f}–{x['loadavg_1min_after']:.1f}" for x in loads)]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name in REPEATS:
        first, again = results(name), results(f"{name}-repeat")
        if first is not None and again is not None:
            lines.append(f"Run-to-run, {name} run twice: " + ", ".join(
                f"{DATASET_NAMES[d]} {first['perplexity'][d]:.3f} then {again['perplexity'][d]:.3f} "
                f"({100 * (again['perplexity'][d] / first['perplexity'][d] - 1):+.2f}%)" for d in DATASETS)
                         + f"; prune {first['timings']['prune_s']:.1f} s then {again['timings']['prune_s']:.1f} s.")
    lines.append("")
    if missing:
        lines.append(f"Missing runs: {', '.join(missing)}; no decision.")
    else:
        within = worst <= TOLERANCE
        lines.append(f"Largest |Δ| over both texts and all four (pruner, sparsity): {100 * worst:.2f}% "
                     f"({'within' if within else 'beyond'} the issue's 1%): "
                     f"{'bfloat16 may become the default' if within else 'float32 stays the default'}.")
    lines += ["", "Prune seconds are `timings.prune_s` of the same runs, on a 2-core machine shared with other "
              "jobs (1-minute load average around each run in the last column): indicative, not a benchmark.", "",
              "Commands (from the repository root, one at a time):", "", "```"]
    lines += [f"python fedspallm/main.py {shlex.join(args)} --output.dir experiments/results/calibration_dtype/{name}"
              for name, args in runs().items()]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    if not args.table:
        os.chdir(REPO)  # the second text is named by its path relative to the repository
        write_second_text()
        for name, run_args in runs().items():
            if results(name) is None:
                execute(name, run_args)
    TABLE.write_text(table())
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
