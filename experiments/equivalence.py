"""Equivalences of the federated runs on the embedded default model, checked by the sha256 of the exported weights.

    python experiments/equivalence.py          # writes experiments/results/equivalence.md (about 18 minutes)
    python experiments/equivalence.py --fresh  # re-runs every row (else a row whose row.json exists is kept)

- fedstats with 1 client against centralized SparseGPT on the same windows (both sum their batches'
  statistics in the same fixed point);
- fedstats with 4 clients in 4 processes, every client sampling every block, against centralized on
  the union of the same 4 clients' windows in 1 process (centralized batches the union client by client);
- FedSpaLLM and fedstats with 4 clients in 4 processes (``fabric run --devices 4``), in 1 process and in
  2 processes (2 + 2), and in 4 processes with ``federation.secure_aggregation``.

FedSpaLLM with 1 client, sampling ``all`` and 1 round is SparseGPT on the same windows bit for bit
(tests/test_federated.py); since centralized prunes from the fixed-point sum of its batches' statistics
it is not the centralized strategy's model bit for bit.

Every process runs one torch thread: BLAS reductions depend on the thread count, the process layout must not.
The unit tests check the same on tiny models (tests/test_federated.py, tests/test_distributed.py); this
script shows it at the real size. 8 calibration windows of 128 tokens keep it short.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "out" / "equivalence"
TABLE = REPO / "experiments" / "results" / "equivalence.md"
FABRIC = str(Path(sys.executable).with_name("fabric"))
MAIN = str(REPO / "fedspallm" / "main.py")
COMMON = [
    "--config", str(REPO / "configs" / "default.yaml"), "--federation.secure_aggregation", "false",
    "--data.nsamples", "8", "--data.seqlen", "128",
    "--eval.seqlen", "128", "--eval.max_windows", "4", "--runtime.threads", "1", "--runtime.progress", "false",
    "--output.save_compressed", "false", "--output.checkpoint", "false",
]
SECURE = ["--federation.secure_aggregation", "true"]
FEDSTATS = ["--federation.strategy", "fedstats"]  # the default budget 0.5: each block from 2 of the 4 clients
UNION = ("centralized SparseGPT on the 4 clients' windows, 1 process",
         "fedstats, 4 clients in 4 processes, every block sampled")
# name: (launcher, the run's own flags, expected strategy and client count). The flags come after --config.
RUNS = {
    "centralized SparseGPT, 1 process": ([sys.executable, MAIN], ["--federation.strategy", "centralized",
                                          "--federation.num_clients", "1"], ("centralized", 1)),
    "fedstats, 1 client": ([sys.executable, MAIN], ["--federation.strategy", "fedstats", "--federation.num_clients",
                                                    "1", "--federation.sampling", "all"], ("fedstats", 1)),
    "FedSpaLLM, 4 clients in 4 processes": ([FABRIC, "run", "--devices", "4", MAIN], [], ("fedspallm", 4)),
    "FedSpaLLM, 4 clients in 1 process": ([sys.executable, MAIN], [], ("fedspallm", 4)),
    "FedSpaLLM, 4 clients in 2 processes": ([sys.executable, MAIN], ["--runtime.devices", "2"], ("fedspallm", 4)),
    "fedstats, 4 clients in 4 processes": ([FABRIC, "run", "--devices", "4", MAIN], FEDSTATS, ("fedstats", 4)),
    "fedstats, 4 clients in 1 process": ([sys.executable, MAIN], FEDSTATS, ("fedstats", 4)),
    "fedstats, 4 clients in 2 processes": ([sys.executable, MAIN], [*FEDSTATS, "--runtime.devices", "2"],
                                           ("fedstats", 4)),
    "FedSpaLLM, 4 clients in 4 processes, secure aggregation": ([FABRIC, "run", "--devices", "4", MAIN], SECURE,
                                                                ("fedspallm", 4)),
    "fedstats, 4 clients in 4 processes, secure aggregation": ([FABRIC, "run", "--devices", "4", MAIN],
                                                               [*FEDSTATS, *SECURE], ("fedstats", 4)),
    UNION[0]: ([sys.executable, MAIN], ["--federation.strategy", "centralized"], ("centralized", 4)),
    UNION[1]: ([FABRIC, "run", "--devices", "4", MAIN], [*FEDSTATS, "--federation.sampling", "all"], ("fedstats", 4)),
}
# Pairs whose exported models must be the same bytes, but one: FedSpaLLM's weight sums under secure
# aggregation's default one-limb encoding come back on its 2^-36 grid (README, "Secure aggregation"), so
# that pair is promised the same perplexity, not the same bytes.
ON_A_GRID = ("FedSpaLLM, 4 clients in 4 processes", "FedSpaLLM, 4 clients in 4 processes, secure aggregation")
PAIRS = [("centralized SparseGPT, 1 process", "fedstats, 1 client"),
         *((f"{s}, 4 clients in 4 processes", f"{s}, 4 clients in {other}") for s in ("FedSpaLLM", "fedstats")
           for other in ("1 process", "2 processes", "4 processes, secure aggregation")), UNION]


def verdict(a: dict, b: dict, pair: tuple[str, str]) -> tuple[str, bool]:
    """The table's cell for a pair, and whether it keeps its promise."""
    if a["sha256"] == b["sha256"]:
        return "yes", True
    if pair == ON_A_GRID:
        same = a["perplexity"] == b["perplexity"]
        return f"no (one-limb grid); perplexity {'equal to the last bit' if same else 'DIFFERS'}", same
    return "NO", False


def run(name: str, launcher: list[str], flags: list[str], expected: tuple[str, int], fresh: bool) -> dict:
    directory = OUT / name.replace(",", "").replace("'", "").replace(" ", "-").lower()
    done = directory / "row.json"
    if done.exists() and not fresh:
        row = json.loads(done.read_text())
        print(f"{name}: {row['sha256'][:16]}  ppl {row['perplexity']:.4f}  (kept from {done})", flush=True)
        return row
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([*launcher, *COMMON, *flags, "--output.dir", str(directory)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    (results_path,) = directory.glob("version_*/results.json")
    results = json.loads(results_path.read_text())
    if (results["strategy"], results["num_clients"]) != expected:  # the run must be the one named
        sys.exit(f"{name}: ran {results['strategy']} with {results['num_clients']} clients, expected {expected}")
    weights = results_path.parent / "model" / "model.safetensors"
    row = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "perplexity": results["perplexity"]["default"],
           "sparsity": results["sparsity"]["overall"], "seconds": time.perf_counter() - start}
    shutil.rmtree(results_path.parent / "model")  # 538 MB each; the digest is what is compared
    (directory / "row.tmp").write_text(json.dumps(row, indent=1))
    (directory / "row.tmp").replace(done)
    print(f"{name}: {row['sha256'][:16]}  ppl {row['perplexity']:.4f}  {row['seconds']:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="re-run every row, even those whose row.json exists")
    fresh = parser.parse_args().fresh
    rows = {name: run(name, *spec, fresh=fresh) for name, spec in RUNS.items()}
    pairs = PAIRS
    lines = [
        "SmolLM2-135M-Instruct (fp32), 70%, seed 0; 8 calibration windows x 128 tokens; one torch thread per process; "
        "perplexity on 4 windows x 128 tokens of the embedded test split. sha256 of the exported model.safetensors.",
        "", "| run | sha256 (first 16) | perplexity | sparsity |", "|---|---|---|---|",
        *(f"| {n} | `{r['sha256'][:16]}` | {r['perplexity']:.4f} | {r['sparsity']:.6f} |"
          for n, r in rows.items()),
        "", "| comparison | bitwise identical |", "|---|---|",
        *(f"| {a} = {b} | {verdict(rows[a], rows[b], (a, b))[0]} |" for a, b in pairs),
    ]
    TABLE.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(verdict(rows[a], rows[b], (a, b))[1] for a, b in pairs):
        sys.exit(1)


if __name__ == "__main__":
    main()
