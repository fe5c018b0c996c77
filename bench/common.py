"""Helpers shared by the benchmarks: this CPU's matmul peak, machine load, memory high-water marks, and the
embedded default model with its calibration and evaluation windows.

Every benchmark measures its reference peak in the same run as its workload, so that the printed
ratios compare like with like on a shared machine. Run as a script, this prints the peaks alone::

    python bench/common.py
"""

from __future__ import annotations

import fedspallm  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

import torch

from fedspallm.cli import tune_allocator
from fedspallm.config import ModelConfig
from fedspallm.data import eval_windows, plan_calibration
from fedspallm.lit import CausalLMModule, evaluate_perplexity
from fedspallm.models import load_model
from fedspallm.runtime import peak_rss_bytes, quiet_libraries, reset_peak_rss  # noqa: F401  (re-exported to the benchmarks)

# The benchmarks run with the process settings the command line uses (and print them: machine_line).
ALLOCATOR_TUNED = tune_allocator()

MB = 2**20  # the benchmarks print MB in units of 2**20 bytes


def matmul_gflops(n: int, dtype: torch.dtype, transposed: bool, repeats: int) -> float:
    """Best of ``repeats`` n x n products (2 n^3 FLOPs each), in GFLOP/s, after one warm-up.

    ``transposed`` times ``A @ B.T``, the layout ``nn.Linear`` computes; otherwise ``A @ B``.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    rhs = b.t() if transposed else b
    torch.matmul(a, rhs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, rhs)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def matmul_peaks(n: int = 2048, repeats: int = 5, dtypes: tuple[str, ...] = ("float32", "bfloat16")
                 ) -> dict[str, dict[str, tuple[int, float]]]:
    """dtype name -> {"A@B.T": (n, GFLOP/s), "A@B": (n, GFLOP/s)} at the current torch thread count.

    bf16 ``A @ B`` (both row-major) can hit a slow reference kernel on CPUs without bf16 units
    (0.2 GFLOP/s at n = 2048 on an AVX2 CPU); it is timed at n = 512 so that it cannot dominate a run.
    """
    peaks: dict[str, dict[str, tuple[int, float]]] = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        n_ab, repeats_ab = (512, 3) if dtype == torch.bfloat16 else (n, repeats)
        peaks[name] = {
            "A@B.T": (n, matmul_gflops(n, dtype, True, repeats_ab)),
            "A@B": (n_ab, matmul_gflops(n_ab, dtype, False, repeats_ab)),
        }
    return peaks


def fp32_peak(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul peak (GFLOP/s): the better of the two layouts."""
    return max(gflops for _, gflops in matmul_peaks(n, repeats, ("float32",))["float32"].values())


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_peaks(peaks: dict[str, dict[str, tuple[int, float]]], indent: str = "  ") -> None:
    print(f"{indent}{'matmul (GFLOP/s)':<12}{'A@B.T (Linear)':>18}{'A@B':>18}")
    for name, row in peaks.items():
        print(f"{indent}{name:<12}" + "".join(f"{f'{gflops:.2f} n={n}':>18}" for n, gflops in row.values()))


def load_average() -> float:
    """The 1-minute load average (processes running or waiting for a CPU)."""
    return os.getloadavg()[0]


def machine_line() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
            + f", malloc tuned as the CLI does: {'yes' if ALLOCATOR_TUNED else 'no'}")


def footer(started: float, load_before: float) -> str:
    return (f"total bench time {time.perf_counter() - started:.0f} s; 1-min load average {load_before:.1f} at start, "
            f"{load_average():.1f} at end (on a shared CPU, other processes' load lowers the ratios)")


# ---------------------------------------------------------------------------------------------
# The embedded default model, its calibration windows and its perplexity, as the prune benchmarks use them.


def pydoc_windows(tokenizer: Any, seqlen: int, count: int) -> torch.Tensor:
    """The second, non-Wikipedia text: the Python language reference and library topics that ship
    with the interpreter (``pydoc_data.topics``, what ``help("TOPIC")`` prints), every topic in
    sorted order joined with blank lines, tokenized as one stream; the first ``count`` windows."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    stream = torch.tensor(tokenizer(text).input_ids)
    count = min(count, stream.numel() // seqlen)
    return stream[: count * seqlen].reshape(count, seqlen)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """The embedded default in float32; ``args.nsamples`` x ``args.seqlen`` calibration windows, drawn as the
    ``centralized`` strategy draws them (seed ``args.seed``); and ``args.eval_windows`` x ``args.eval_seqlen``
    windows of each evaluation text: ``default`` (the embedded test split) and ``pydoc``."""
    quiet_libraries()
    loaded = load_model(ModelConfig(dtype="float32"))
    plan = plan_calibration("default", loaded.tokenizer, args.nsamples, args.seqlen, 1, "iid", 0.5, args.seed)
    evaluation = {"default": eval_windows("default", loaded.tokenizer, args.eval_seqlen, args.eval_windows),
                  "pydoc": pydoc_windows(loaded.tokenizer, args.eval_seqlen, args.eval_windows)}
    return loaded.model, plan.all_windows(), evaluation


def perplexity(model: torch.nn.Module, sets: dict[str, torch.Tensor], args: argparse.Namespace
               ) -> tuple[dict[str, float], float]:
    """Perplexity on each of ``sets`` (name -> windows), and the seconds it took."""
    start = time.perf_counter()
    values = {name: evaluate_perplexity(None, CausalLMModule(model), windows, args.eval_batch_size, progress=False)
              for name, windows in sets.items()}
    return values, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Whole runs, as a user launches them.

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_run(devices: int, config: str | Path, extra: list[str]) -> tuple[dict, str | None, float]:
    """``fabric run --devices N fedspallm/main.py --config C ...`` into a temporary directory: its
    results.json, the exported model.safetensors' sha256 (None without an export) and the wall time of
    the whole command (launch, imports and all). A failed run stops the bench with its exit code."""
    fabric = str(Path(sys.executable).with_name("fabric"))
    with tempfile.TemporaryDirectory(prefix="fedspallm-bench-") as out:
        command = [fabric, "run", "--devices", str(devices), "--main-port", str(free_port()),
                   str(REPO / "fedspallm" / "main.py"), "--config", str(config), "--output.dir", out,
                   "--runtime.progress", "false", *extra]
        print(" ".join(command).replace(out, "<tmp>"), flush=True)
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - started
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            sys.exit(run.returncode)
        (path,) = Path(out).glob("version_*/results.json")
        results = json.loads(path.read_text())
        model_file = Path(out).glob("version_*/model/model.safetensors")
        digest = next((hashlib.sha256(p.read_bytes()).hexdigest() for p in model_file), None)
    return results, digest, seconds


# ---------------------------------------------------------------------------------------------
# Memory. ``ru_maxrss`` is the process's resident high-water mark. On Linux, writing "5" to
# /proc/self/clear_refs resets it (and VmHWM) to the current RSS, so the peak of one phase can be
# read without the phases before it (model loading, for example).


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description="This CPU's matmul peak (the reference of the other benchmarks).")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started, load_before = time.perf_counter(), load_average()
    print(f"\nmatmul peak: {machine_line()}")
    print_peaks(matmul_peaks(args.matmul_n, args.repeats))
    with torch_threads(1):
        print(f"  float32 on 1 thread: {fp32_peak(args.matmul_n, args.repeats):.2f} GFLOP/s")
    print(f"  {footer(started, load_before)}")


if __name__ == "__main__":
    main()
