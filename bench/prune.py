"""Centralized pruning of the embedded default model: SparseGPT, Wanda and magnitude, measured in one run.

    python bench/prune.py                          # the issue-17 protocol: 32 x 512, 50%, fp32 and bf16 calibration
    python bench/prune.py --more-sparsities 0.7    # adds the 70% rows of the calibration-dtype table
    python bench/prune.py --nsamples 8 --seqlen 256 --calibration-dtypes float32   # quicker

Setting (the defaults): all 30 blocks of the embedded SmolLM2-135M in float32, unstructured 50%
sparsity, ``--nsamples`` 32 calibration windows x ``--seqlen`` 512 tokens (16,384 tokens) drawn by
``plan_calibration("default", ..., partition="iid", seed=0)`` exactly as the ``centralized`` strategy
draws them, calibration batch 8; perplexity on two texts, ``--eval-windows`` 16 windows x 512 tokens
each: ``eval_windows("default")`` (the embedded test split, Wikipedia) and the Python reference
topics that ship with the interpreter (``pydoc_data.topics``: not Wikipedia, offline everywhere).

Calibration dtype (``pruning.calibration_dtype``): SparseGPT and Wanda run once per
``--calibration-dtypes`` entry (block forwards in that dtype; statistics and solves in float32), each
in its own worker, which measures the float32 and bfloat16 matmul peaks itself right before its
prune; the table prints prune seconds, both peaks, prune seconds x fp32 peak (GFLOP: comparable
across machines and loads) and both perplexities, with the change against float32 calibration.

Every method runs in a fresh subprocess (one after another, never two at once), so that memory and
allocator state do not carry over and ``ru_maxrss`` is that method's own. Right before the prune the
worker resets the high-water mark (Linux ``/proc/self/clear_refs``), so "peak RSS" is the peak
*during the prune*: the model's own 0.5 GB plus what the prune adds. The model load is excluded.

Printed per method: prune wall time (``prune_sequential`` from the first block's capture to the
last block's outputs), calibration tokens/s (calibration tokens / prune wall time), peak RSS,
perplexity, and the time split into statistics (hooks' ``accumulate_*``), solve (the pruning kernel)
and the rest (block forward passes, capture, bookkeeping).

Shared statistics. A separate worker (``dense``) runs the first ``--hessian-blocks`` blocks densely,
keeps each projection's input for every batch, and times ``accumulate_hessian`` on them twice: once
per distinct input (the engine: q/k/v share one Hessian, gate/up another) and once per projection
(the naive variant: 7 Hessians per Llama block instead of 4). Best of ``--repeats``. The same
worker gives the dense perplexity.

Achieved FLOP/s of the whole SparseGPT prune = counted FLOPs / prune wall time, where

    forward   passes x tokens x (2 P_b + 4 T d)  per block pass: P_b = the block's projection weights,
              the attention term counts the full T x T score matrix (Q K^T and A V, as in
              bench/eval_throughput.py), T = seqlen, d = hidden size; "passes" is the engine's own
              count (2 per pruned block: statistics, then pruned outputs)
    Hessian   2 t c^2 per accumulate_hessian call on t tokens of width c (one per distinct input and batch)
    solve     per group of projections sharing one Hessian [c, c] (q/k/v, gate/up; o and down alone),
              r = their stacked rows, blocksize B, tile widths b:
              inverse: Cholesky + triangular inverse c^3/3 + c^3/3 = 2c^3/3 (the triangular solve
                       against I does c^3, half of it on the zeros of I; only c^3/3 is counted)
              OBS sweep inside each tile             sum_i 2 r (b - i - 1)    = r b (b - 1)   (~ r c B in all)
              lazy update of the later columns       2 r b (c - c_end)                       (~ r c^2 in all)

The ratio to the fp32 matmul peak uses the best peak seen in this run (measured before and after the
workers, on 2 threads and on 1), i.e. the least flattering denominator.
"""

from __future__ import annotations

from common import (  # first: imports fedspallm (the OpenMP wait policy) before torch
    MB,
    matmul_peaks,
    current_rss_bytes,
    fp32_peak,
    footer,
    load,
    load_average,
    machine_line,
    peak_rss_bytes,
    perplexity,
    reset_peak_rss,
    torch_threads,
)

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import fedspallm.calibration as engine
import fedspallm.pruners.sparsegpt as sparsegpt_module
from fedspallm.calibration import PruneSpec, SequentialCalibration, prune_sequential
from fedspallm.models import find_decoder_blocks, find_prunable_layers, get_weight
from fedspallm.pruners import accumulate_hessian

METHODS = ("sparsegpt", "wanda", "magnitude")


# ---------------------------------------------------------------------------------------------
# FLOP counts


def solve_flops(rows: int, cols: int, blocksize: int) -> dict[str, float]:
    """SparseGPT's solve on one group of stacked [rows, cols] weights (unstructured): see the module docstring."""
    sweep = lazy = 0.0
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        b = c1 - c0
        sweep += rows * b * (b - 1)
        lazy += 2.0 * rows * b * (cols - c1)
    return {"inverse": 2.0 * cols**3 / 3, "sweep": sweep, "lazy": lazy}


def block_forward_flops_per_token(model: torch.nn.Module, seqlen: int) -> float:
    """2 P_b + 4 T d for one decoder block (the blocks are identical)."""
    block = find_decoder_blocks(model)[0]
    weights = sum(get_weight(layer).numel() for layer in find_prunable_layers(block).values())
    d = model.config.get_text_config().hidden_size
    return 2.0 * weights + 4.0 * seqlen * d


# ---------------------------------------------------------------------------------------------
# Instrumentation: wrap the engine's kernels (as the engine module sees them) with timers and counters.


class Meter:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, key: str, seconds: float, flops: float = 0.0) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.flops[key] = self.flops.get(key, 0.0) + flops
        self.calls[key] = self.calls.get(key, 0) + 1

    def wrap(self, key: str, fn: Callable, flops: Callable[..., float] | None = None) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(key, time.perf_counter() - start, flops(*args, **kwargs) if flops else 0.0)
            return out

        return timed


def instrument(meter: Meter, blocksize: int) -> None:
    def hessian_flops(hessian: Any, nsamples: int, inputs: torch.Tensor) -> float:
        width = inputs.shape[-1]
        return 2.0 * (inputs.numel() // width) * width**2

    engine.accumulate_hessian = meter.wrap("statistics", engine.accumulate_hessian, hessian_flops)
    engine.accumulate_sq_norms = meter.wrap("statistics", engine.accumulate_sq_norms)
    engine.wanda_prune = meter.wrap("solve", engine.wanda_prune)
    engine.magnitude_prune = meter.wrap("solve", engine.magnitude_prune)

    # SparseGPT: the inverse and the OBS sweep separately; one call per group of projections that
    # share a Hessian.
    sparsegpt = engine.sparsegpt_prune_group
    inverse = sparsegpt_module.inverse_hessian_cholesky
    tiles = sparsegpt_module._prune_tiles

    def sparsegpt_prune_group(weights: list[torch.Tensor], hessian: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counts = solve_flops(sum(w.shape[0] for w in weights), hessian.shape[0], blocksize)
        start = time.perf_counter()
        out = sparsegpt(weights, hessian, *args, **kwargs)
        meter.add("solve", time.perf_counter() - start, sum(counts.values()))
        meter.flops["inverse"] = meter.flops.get("inverse", 0.0) + counts["inverse"]
        meter.flops["sweep"] = meter.flops.get("sweep", 0.0) + counts["sweep"] + counts["lazy"]
        return out

    engine.sparsegpt_prune_group = sparsegpt_prune_group
    sparsegpt_module.inverse_hessian_cholesky = meter.wrap("inverse", inverse)
    sparsegpt_module._prune_tiles = meter.wrap("sweep", tiles)


# ---------------------------------------------------------------------------------------------
# Workers (one subprocess each)


def best_peak(name: str) -> float:
    """This process's matmul peak in ``name`` (GFLOP/s, the better layout), at its thread count."""
    return max(gflops for _, gflops in matmul_peaks(repeats=3, dtypes=(name,))[name].values())


def method_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    model, windows, evaluation = load(args)
    spec = PruneSpec(method, args.sparsity, blocksize=args.blocksize, calibration_dtype=args.calibration_dtype)
    meter = Meter()
    instrument(meter, spec.blocksize)
    peaks_before = {name: best_peak(name) for name in ("float32", "bfloat16")}  # this process, right before
    rss_before = current_rss_bytes()
    exact_peak = reset_peak_rss()
    start = time.perf_counter()
    result = prune_sequential(model, windows, spec, batch_size=args.batch_size)
    prune_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    ppl, eval_s = perplexity(model, evaluation, args)
    stats = result.stats
    batches = math.ceil(windows.shape[0] / args.batch_size)
    token_passes = stats.forward_passes / batches * stats.tokens  # every block pass covers all batches
    return {
        "method": method, "prune_s": prune_s, "tokens": stats.tokens, "forward_passes": stats.forward_passes,
        "statistic_updates": stats.statistic_updates, "layers_pruned": stats.layers_pruned,
        "forward_flops": token_passes * block_forward_flops_per_token(model, args.seqlen),
        "rss_before": rss_before, "peak_rss": peak, "exact_peak": exact_peak,
        "result_bytes": sum(r.weight.numel() * r.weight.element_size() + r.mask.numel() * r.mask.element_size()
                            for r in result.pruned.values()),
        "ppl": ppl, "eval_s": eval_s, "seconds": meter.seconds, "flops": meter.flops, "calls": meter.calls,
        "calibration_dtype": args.calibration_dtype, "sparsity": args.sparsity, "matmul_peaks": peaks_before,
        "load": load_average(),
    }


def dense_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Dense perplexity, and accumulate_hessian once per distinct input vs once per projection."""
    model, windows, evaluation = load(args)
    ppl, eval_s = perplexity(model, evaluation, args)
    blocks = find_decoder_blocks(model)
    with torch.no_grad():
        walk = SequentialCalibration(model, windows, PruneSpec("sparsegpt"), batch_size=args.batch_size,
                                     device="cpu")
        per_layer: list[dict[str, list[torch.Tensor]]] = []  # block -> layer -> its input per batch
        for index in range(min(args.hessian_blocks, len(blocks))):
            layers = find_prunable_layers(blocks[index])
            inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
            handles = [layer.register_forward_hook(lambda mod, a, out, name=name: inputs[name].append(a[0].detach()))
                       for name, layer in layers.items()]
            walk.advance(index)
            for handle in handles:
                handle.remove()
            per_layer.append(inputs)

    def distinct(inputs: dict[str, list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for tensors in inputs.values():
            key = tuple(t.data_ptr() for t in tensors)
            groups.setdefault(key, tensors)
        return list(groups.values())

    def timed(streams: list[list[torch.Tensor]]) -> float:
        start = time.perf_counter()
        for tensors in streams:
            h, n = None, 0
            for x in tensors:
                h, n = accumulate_hessian(h, n, x)
        return time.perf_counter() - start

    shared_streams = [s for inputs in per_layer for s in distinct(inputs)]
    naive_streams = [s for inputs in per_layer for s in inputs.values()]
    def flops(streams: list[list[torch.Tensor]]) -> float:
        return sum(2.0 * x.numel() * x.shape[-1] for tensors in streams for x in tensors)

    shared_s, naive_s = float("inf"), float("inf")
    timed(shared_streams)  # warm-up
    for _ in range(args.repeats):  # interleaved, so that a change in machine load hits both
        shared_s = min(shared_s, timed(shared_streams))
        naive_s = min(naive_s, timed(naive_streams))
    return {
        "method": "dense", "ppl": ppl, "eval_s": eval_s, "hessian_blocks": len(per_layer),
        "num_blocks": len(blocks), "shared_hessians": len(shared_streams), "naive_hessians": len(naive_streams),
        "shared_s": shared_s, "naive_s": naive_s, "shared_flops": flops(shared_streams),
        "naive_flops": flops(naive_streams),
    }


# ---------------------------------------------------------------------------------------------
# The driver


def run_worker(name: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench/prune.py: the {name} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peaks() -> dict[str, float]:
    out = {"2 threads": fp32_peak(repeats=3)}
    with torch_threads(1):
        out["1 thread"] = fp32_peak(repeats=3)
    return out


def report(args: argparse.Namespace, rows: dict[str, dict[str, Any]], peak_runs: list[dict[str, float]],
           started: float, load_before: float) -> None:
    dense, sgpt = rows["dense"], rows["sparsegpt"]
    peak = max(max(p.values()) for p in peak_runs)
    print(f"\nfedspallm prune bench: embedded SmolLM2-135M (float32), centralized, all {dense['num_blocks']} blocks, "
          f"unstructured {args.sparsity:.0%}")
    print(f"  {machine_line()}")
    print(f"  calibration: {args.nsamples} windows x {args.seqlen} tokens = {sgpt['tokens']} tokens (default corpus, "
          f"iid, seed {args.seed}), batch {args.batch_size}; perplexity: {args.eval_windows} x {args.eval_seqlen} "
          "test windows")
    print("  fp32 matmul peak (GFLOP/s, best of A@B.T and A@B, n=2048): "
          + "; ".join(", ".join(f"{k} {v:.1f}" for k, v in p.items()) + f" ({when})"
                      for p, when in zip(peak_runs, ("start", "end"))))
    print()
    print(f"  {'method':<10}{'prune s':>9}{'tokens/s':>10}{'stats s':>9}{'solve s':>9}{'rest s':>8}"
          f"{'RSS0 MB':>9}{'peak MB':>9}{'+MB':>7}{'kept MB':>9}{'ppl':>10}")
    print(f"  {'dense':<10}{'':>9}{'':>10}{'':>9}{'':>9}{'':>8}{'':>9}{'':>9}{'':>7}{'':>9}{dense['ppl']['default']:>10.2f}")
    for method in METHODS:
        r = rows[method]
        stats_s, solve_s = r["seconds"].get("statistics", 0.0), r["seconds"].get("solve", 0.0)
        print(f"  {method:<10}{r['prune_s']:>9.1f}{r['tokens'] / r['prune_s']:>10.1f}{stats_s:>9.1f}{solve_s:>9.1f}"
              f"{r['prune_s'] - stats_s - solve_s:>8.1f}{r['rss_before'] / MB:>9.0f}{r['peak_rss'] / MB:>9.0f}"
              f"{(r['peak_rss'] - r['rss_before']) / MB:>7.0f}{r['result_bytes'] / MB:>9.0f}{r['ppl']['default']:>10.2f}")
    exact = all(rows[m]["exact_peak"] for m in METHODS)
    print("  (rest = block forward passes, capture and bookkeeping; peak = RSS high-water mark during the prune"
          + ("" if exact else ", NOT reset here: it includes the model load") + "; +MB = peak - RSS0;")
    print("   kept MB = the pruned weights and masks that prune_sequential returns, held beside the model's own)")

    # Shared statistics
    naive_ratio = dense["naive_s"] / dense["shared_s"]
    hessian_in_prune = sgpt["seconds"].get("statistics", 0.0)
    print()
    print(f"  Hessians on the first {dense['hessian_blocks']} blocks' captured inputs (best of {args.repeats}):")
    print(f"    shared (engine)      {dense['shared_hessians']:>3} Hessians  {dense['shared_s']:>7.3f} s")
    print(f"    per projection       {dense['naive_hessians']:>3} Hessians  {dense['naive_s']:>7.3f} s"
          f"   -> naive / shared = {naive_ratio:.2f}x in time, "
          f"{dense['naive_flops'] / dense['shared_flops']:.2f}x in FLOPs")
    print(f"    in the SparseGPT prune, Hessians took {hessian_in_prune:.1f} s of {sgpt['prune_s']:.1f} s; the naive variant"
          f" would add about {hessian_in_prune * (naive_ratio - 1):.1f} s")

    # FLOP/s of the SparseGPT prune
    f, s = sgpt["flops"], sgpt["seconds"]
    rest_s = sgpt["prune_s"] - s.get("statistics", 0.0) - s.get("solve", 0.0)
    parts = [
        ("forward", sgpt["forward_flops"], rest_s, "block passes (+ capture, bookkeeping)"),
        ("Hessian", f.get("statistics", 0.0), s.get("statistics", 0.0), "accumulate_hessian (addmm X^T X)"),
        ("inverse", f.get("inverse", 0.0), s.get("inverse", 0.0),
         f"{sgpt['calls'].get('inverse', 0)} inverse Cholesky factors, one per shared Hessian"),
        ("OBS sweep", f.get("sweep", 0.0), s.get("sweep", 0.0),
         "tiles: rank-1 updates (1 thread) + sub-tile and tile addmm"),
    ]
    other_solve = s.get("solve", 0.0) - s.get("inverse", 0.0) - s.get("sweep", 0.0)
    total_flops = sum(p[1] for p in parts)
    print()
    print(f"  SparseGPT FLOPs (formulas in the docstring) against the fp32 peak {peak:.1f} GFLOP/s:")
    print(f"    {'phase':<11}{'GFLOP':>8}{'seconds':>9}{'GFLOP/s':>9}{'of peak':>9}  what")
    for name, flops, seconds, what in parts:
        rate = flops / seconds / 1e9 if seconds > 0 else 0.0
        print(f"    {name:<11}{flops / 1e9:>8.1f}{seconds:>9.1f}{rate:>9.2f}{rate / peak:>9.2f}  {what}")
    print(f"    {'solve misc':<11}{0.0:>8.1f}{other_solve:>9.1f}{'':>9}{'':>9}  copies, checks, mask writes")
    achieved = total_flops / sgpt["prune_s"] / 1e9
    print(f"    {'whole prune':<11}{total_flops / 1e9:>8.1f}{sgpt['prune_s']:>9.1f}{achieved:>9.2f}{achieved / peak:>9.2f}"
          f"  target >= 0.50")
    # Forward passes and Hessians grow with the calibration tokens, the solve does not.
    scale = 128 * args.seqlen / sgpt["tokens"]
    grown_s = (rest_s + s.get("statistics", 0.0)) * scale + s.get("solve", 0.0)
    grown = ((parts[0][1] + parts[1][1]) * scale + parts[2][1] + parts[3][1]) / grown_s / 1e9
    print(f"    at these rates, 128 windows x {args.seqlen} would reach {grown / peak:.2f} of peak (solve time does not grow"
          " with the calibration size)")
    print()
    print(f"  {footer(started, load_before)}")
    times = " : ".join(f"{rows[m]['prune_s'] / sgpt['prune_s']:.2f}" for m in METHODS)
    ppls = " / ".join(f"{rows[m]['ppl']['default'] / dense['ppl']['default']:.2f}" for m in METHODS)
    print(f"summary: prune time sparsegpt : wanda : magnitude = {times}; ppl / dense = {ppls}; "
          f"naive / shared Hessian time = {naive_ratio:.2f}x; SparseGPT achieved / fp32 peak = {achieved / peak:.2f} "
          f"({achieved:.1f} of {peak:.1f} GFLOP/s)")


def report_dtypes(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> None:
    """Calibration dtypes side by side: prune time, this worker's own peaks, time x peak, perplexities."""
    dense = rows["dense"]["ppl"]
    print()
    print("  calibration dtype (block forwards; statistics and solves in float32); each row its own process, its "
          "matmul peaks (GFLOP/s) measured in it right before its prune;")
    print("  s x fp32 peak = prune seconds x fp32 peak (GFLOP): comparable across machines and loads")
    print(f"    {'method':<10}{'sparsity':>9}{'dtype':>10}{'prune s':>9}{'fp32 pk':>9}{'bf16 pk':>9}{'s x fp32 pk':>12}"
          f"{'load':>6}{'ppl default':>12}{'ppl pydoc':>11}{'/fp32 def':>10}{'/fp32 py':>9}")
    print(f"    {'dense':<10}{'':>9}{'':>10}{'':>9}{'':>9}{'':>9}{'':>12}{'':>6}{dense['default']:>12.3f}"
          f"{dense['pydoc']:>11.3f}")
    for key, r in rows.items():
        if key == "dense":
            continue
        base = rows.get(f"{r['method']}/float32/{r['sparsity']}", r)["ppl"]
        peaks = r["matmul_peaks"]
        print(f"    {r['method']:<10}{r['sparsity']:>9.0%}{r['calibration_dtype']:>10}{r['prune_s']:>9.1f}"
              f"{peaks['float32']:>9.1f}{peaks['bfloat16']:>9.1f}{r['prune_s'] * peaks['float32']:>12.0f}{r['load']:>6.1f}"
              f"{r['ppl']['default']:>12.3f}{r['ppl']['pydoc']:>11.3f}{r['ppl']['default'] / base['default'] - 1:>+10.2%}"
              f"{r['ppl']['pydoc'] / base['pydoc'] - 1:>+9.2%}")
    at = {k: r for k, r in rows.items() if k != "dense" and r["sparsity"] == args.sparsity}
    print(f"summary (calibration dtypes, {args.sparsity:.0%}): " + "; ".join(
        f"{r['method']} {r['calibration_dtype']} {r['prune_s']:.1f} s x {r['matmul_peaks']['float32']:.0f} GFLOP/s = "
        f"{r['prune_s'] * r['matmul_peaks']['float32']:.0f} GFLOP, ppl {r['ppl']['default']:.3f} / {r['ppl']['pydoc']:.3f}"
        for r in at.values()))
    print(f"  (ppl default: {args.eval_windows} x {args.eval_seqlen} windows of the embedded test split; ppl pydoc: "
          f"the first {args.eval_windows} x {args.eval_seqlen} tokens of the Python reference topics, pydoc_data.topics of "
          f"Python {sys.version.split()[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration tokens per window")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    parser.add_argument("--sparsity", type=float, default=0.5, help="the main table's sparsity")
    parser.add_argument("--more-sparsities", default="",
                        help="comma-separated extra sparsities for the calibration-dtype table (e.g. 0.7)")
    parser.add_argument("--calibration-dtypes", default="float32,bfloat16",
                        help="calibration dtypes compared (SparseGPT and Wanda; magnitude runs no forward)")
    parser.add_argument("--calibration-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    parser.add_argument("--eval-windows", type=int, default=16, help="windows of each evaluation text")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--hessian-blocks", type=int, default=4, help="blocks timed for the naive Hessian variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("dense", *METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        with torch.no_grad():
            row = dense_worker(args) if args.worker == "dense" else method_worker(args.worker, args)
        print(json.dumps(row))
        return

    started, load_before = time.perf_counter(), load_average()
    argv = [a for a in sys.argv[1:]]
    peak_runs = [peaks()]
    rows = {}
    print(f"[{time.perf_counter() - started:5.0f} s] dense ...", file=sys.stderr, flush=True)
    rows["dense"] = run_worker("dense", argv)
    sparsities = [args.sparsity] + [float(v) for v in args.more_sparsities.split(",") if v]
    for sparsity in sparsities:
        for method in METHODS:
            for dtype in (args.calibration_dtypes.split(",") if method != "magnitude" else ["float32"]):
                key = f"{method}/{dtype}/{sparsity}"
                print(f"[{time.perf_counter() - started:5.0f} s] {key} ...", file=sys.stderr, flush=True)
                rows[key] = run_worker(method, argv + ["--sparsity", str(sparsity), "--calibration-dtype", dtype])
    peak_runs.append(peaks())
    main_rows = {"dense": rows["dense"]} | {m: rows[f"{m}/float32/{args.sparsity}"] for m in METHODS}
    report(args, main_rows, peak_runs, started, load_before)
    report_dtypes(args, {k: v for k, v in rows.items() if not k.startswith("magnitude")})


if __name__ == "__main__":
    main()
