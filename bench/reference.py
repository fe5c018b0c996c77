"""The original SparseGPT and Wanda pipelines against this project's engine: issue 17's time ratio.

    python bench/reference.py                      # the issue-17 protocol: 32 x 512, 50%, fp32, both methods
    python bench/reference.py --nsamples 2 --seqlen 64 --eval-windows 1 --threads 1   # a smoke run

(The SparseGPT solves do not shrink with the calibration set: the reference's take 30 s or more even in
the smoke run.)

Protocol (the defaults). The embedded SmolLM2-135M in float32, all 30 blocks, unstructured 50%;
``--nsamples`` 32 calibration windows x ``--seqlen`` 512 tokens drawn by
``plan_calibration("default", ..., partition="iid", seed=0)`` exactly as the ``centralized`` strategy
and ``bench/prune.py`` draw them. For each method, in one process and back to back: put the dense
weights back, measure the fp32 matmul peak (``common.fp32_peak``, this process, right before), time
the reference pipeline, evaluate; put the dense weights back, measure the peak, time ours
(``prune_sequential(model, windows, PruneSpec(method, sparsity), batch_size=8)``), evaluate.
Perplexity on ``--eval-windows`` 8 x ``--eval-seqlen`` 512 windows of two texts (``common.load``: the
embedded test split and the Python reference topics). Printed: both prune times, ours / reference (issue 17's goal:
<= 0.5), both perplexities, and prune seconds x the peak measured before each (GFLOP: comparable
across loads, since the machine is shared). Torch runs ``--threads`` threads (default: every CPU, the
command line's choice for one process) on both sides. The reference's column-by-column loop is
thousands of tiny operations per matrix, and on a busy CPU they slow down far more on 2 threads than
on 1 (one 576 x 1536 ``fasterprune`` under a load of 3.5 on 2 cores: 0.3-0.4 s on 1 thread, 2.2-17 s
on 2); ``--threads 1`` shows the originals at their best on a shared machine.

The reference pipelines are this file's own transcription of the published algorithms' structure
(written from their description, not copied; facts in NOTES.md), adapted minimally to a CPU
and to transformers 5:

- SparseGPT after IST-DASLab/sparsegpt (``llama.py`` ``llama_sequential``, ``sparsegpt.py`` class
  ``SparseGPT``): a stand-in for layer 0 stores each window's input and raises; then per decoder
  layer every ``nn.Linear`` gets its own fp32 Hessian (running mean, one per linear: q, k and v each
  build the same one), every window runs through the layer one at a time with hooks on, each linear
  is pruned by ``fasterprune`` (dead inputs, 1% damping, upper Cholesky factor of the inverse, tiles
  of 128 columns whose mask is the lowest ``w^2 / diag(Hinv)^2`` of the whole tile by ``torch.sort``,
  column-by-column OBS update and the lazy update of the later columns), and the windows run through
  the pruned layer again to give the next layer's inputs.
- Wanda after locuslab/wanda (``lib/prune.py`` ``prune_wanda``, ``lib/layerwrapper.py``
  ``WrappedGPT``): the same capture and layer loop; each linear keeps a running mean of its input
  columns' squared norms, and each row of ``|W| * sqrt(norms)`` loses its lowest ``int(cols * s)``
  entries by a stable ``torch.sort``.

The adaptations: everything stays on the CPU (no device moves, no ``empty_cache``); the stand-in keeps
*every* keyword argument the model gives layer 0 (transformers 5 layers need ``position_embeddings``
besides ``attention_mask``) and all layers reuse them, as the originals reuse their mask (right for
this Llama model: every layer gets the same mask and rotary tables); a layer's output is taken whether
it returns a tensor (transformers 5) or a tuple; only the unstructured path is written (no N:M, no
per-layer printing). As in the original, a SparseGPT tile prunes every score ``<=`` the one at the
sparsity quantile, i.e. ``int(tile * s) + 1`` entries: one more than 50% per 128-column tile.
"""

from __future__ import annotations

from common import fp32_peak, footer, load, load_average, machine_line, perplexity  # first: imports fedspallm

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from fedspallm.allocator import release_freed_memory
from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules, set_weight

METHODS = ("sparsegpt", "wanda")


# ---------------------------------------------------------------------------------------------
# The reference pipelines: the originals' structure, kept plain so that their cost is theirs.


class _Caught(Exception):
    """Raised by the stand-in for layer 0 once it has its input: nothing past layer 0 needs to run."""


class Catcher(nn.Module):
    """Stands in for layer 0 during the capture: stores each window's input and the layer's kwargs."""

    def __init__(self, layer: nn.Module, inputs: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.inputs = layer, inputs
        self.count, self.kwargs = 0, {}

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.inputs[self.count] = hidden[0]
        self.count += 1
        # Every window has the same length and no padding, so the last window's mask and rotary
        # tables are every window's: the originals keep the last one too.
        self.kwargs = kwargs
        raise _Caught


@torch.no_grad()
def capture_layer0(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Layer 0's input for every window [n, seqlen, hidden] and the keyword arguments the model gives it."""
    layers = find_decoder_blocks(model)
    dtype = next(model.parameters()).dtype
    inputs = torch.zeros((*windows.shape, model.config.hidden_size), dtype=dtype)
    catcher = Catcher(layers[0], inputs)
    use_cache, model.config.use_cache = model.config.use_cache, False  # no KV cache: each window runs once
    layers[0] = catcher
    try:
        for window in windows:  # batch 1, as the originals feed their dataloader
            try:
                model(window.unsqueeze(0))
            except _Caught:
                pass
    finally:
        layers[0] = catcher.layer
        model.config.use_cache = use_cache
    return inputs, catcher.kwargs


def _output(result: Any) -> torch.Tensor:
    """A decoder layer's hidden states: transformers 5 returns the tensor, older versions a tuple."""
    return result[0] if isinstance(result, tuple) else result


class Accumulator(Protocol):
    layer: nn.Linear

    def add_batch(self, inputs: torch.Tensor) -> None: ...


A = TypeVar("A", bound=Accumulator)


@torch.no_grad()
def reference_sequential(model: nn.Module, windows: torch.Tensor, wrap: Callable[[nn.Linear], A],
                         prune: Callable[[A], None]) -> None:
    """The originals' layer loop: statistics of every linear of a layer from all windows, prune each
    linear on its own, then run the windows through the pruned layer to feed the next."""
    inputs, kwargs = capture_layer0(model, windows)
    outputs = torch.zeros_like(inputs)
    for layer in find_decoder_blocks(model):
        linears = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        wrapped = {name: wrap(linear) for name, linear in linears.items()}
        handles = [linear.register_forward_hook(lambda _m, args, _out, w=wrapped[name]: w.add_batch(args[0].data))
                   for name, linear in linears.items()]
        for j in range(len(inputs)):  # one window at a time, as the originals run them
            outputs[j] = _output(layer(inputs[j].unsqueeze(0), **kwargs))[0]
        for handle in handles:
            handle.remove()
        for accumulator in wrapped.values():
            prune(accumulator)
        for j in range(len(inputs)):
            outputs[j] = _output(layer(inputs[j].unsqueeze(0), **kwargs))[0]
        inputs, outputs = outputs, inputs


def _tokens(inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A hook's input as [tokens, in] and the number of sequences in it (a 2-D input is one sequence)."""
    if inputs.dim() == 2:
        inputs = inputs.unsqueeze(0)
    return inputs.reshape(-1, inputs.shape[-1]), inputs.shape[0]


class SparseGPTLayer:
    """One linear's Hessian, and its SparseGPT prune (after ``sparsegpt.py``'s ``SparseGPT``)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.columns = layer.weight.shape[1]
        self.hessian = torch.zeros((self.columns, self.columns))
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x, batch = _tokens(inputs)
        # A running mean over sequences, in fp32: H = (2/n) sum x x^T without ever holding the sum.
        self.hessian *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x.t().float()
        self.hessian += x.matmul(x.t())

    def fasterprune(self, sparsity: float, blocksize: int = 128, percdamp: float = 0.01) -> None:
        weight = self.layer.weight.data.clone().float()
        hessian = self.hessian
        del self.hessian
        dead = torch.diag(hessian) == 0  # inputs that were always zero: any weight there is free to go
        hessian[dead, dead] = 1
        weight[:, dead] = 0
        losses = torch.zeros(weight.shape[0])
        damp = percdamp * torch.mean(torch.diag(hessian))  # relative, so the scale of H does not matter
        diagonal = torch.arange(self.columns)
        hessian[diagonal, diagonal] += damp
        hessian = torch.linalg.cholesky(hessian)
        hessian = torch.cholesky_inverse(hessian)
        hinv = torch.linalg.cholesky(hessian, upper=True)  # its rows are the OBS updates, column by column
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            tile = weight[:, i1:i2].clone()
            quantized, errors, tile_losses = torch.zeros_like(tile), torch.zeros_like(tile), torch.zeros_like(tile)
            hinv_tile = hinv[i1:i2, i1:i2]
            # One mask for the whole tile, from the weights as the earlier tiles' updates left them.
            scores = tile**2 / torch.diag(hinv_tile).reshape((1, -1)) ** 2
            threshold = torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]
            pruned = scores <= threshold
            for i in range(i2 - i1):
                w, d = tile[:, i], hinv_tile[i, i]
                q = w.clone()
                q[pruned[:, i]] = 0
                quantized[:, i] = q
                tile_losses[:, i] = (w - q) ** 2 / d**2  # the original's reported error: part of its cost
                error = (w - q) / d
                tile[:, i:] -= error.unsqueeze(1).matmul(hinv_tile[i, i:].unsqueeze(0))
                errors[:, i] = error
            weight[:, i1:i2] = quantized
            losses += torch.sum(tile_losses, 1) / 2
            weight[:, i2:] -= errors.matmul(hinv[i1:i2, i2:])  # the later columns get the tile's errors at once
        self.layer.weight.data = weight.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


class WandaLayer:
    """One linear's running mean of squared input-column norms (after ``layerwrapper.py``'s ``WrappedGPT``)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1])
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x, batch = _tokens(inputs)
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.norm(x.t().float(), p=2, dim=1) ** 2 / self.nsamples


def wanda_prune_layer(wrapped: WandaLayer, sparsity: float) -> None:
    """Zero the lowest ``int(cols * sparsity)`` of each row of |W| * ||x_j|| (``prune_wanda``'s unstructured case)."""
    weight = wrapped.layer.weight.data
    metric = torch.abs(weight) * torch.sqrt(wrapped.scaler_row.reshape((1, -1)))
    order = torch.sort(metric, dim=-1, stable=True)[1]  # stable: ties go by column, reproducibly
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    weight[pruned] = 0


def reference_sparsegpt(model: nn.Module, windows: torch.Tensor, sparsity: float) -> None:
    reference_sequential(model, windows, SparseGPTLayer, lambda layer: layer.fasterprune(sparsity))


def reference_wanda(model: nn.Module, windows: torch.Tensor, sparsity: float) -> None:
    reference_sequential(model, windows, WandaLayer, lambda layer: wanda_prune_layer(layer, sparsity))


REFERENCES: dict[str, Callable[[nn.Module, torch.Tensor, float], None]] = {
    "sparsegpt": reference_sparsegpt, "wanda": reference_wanda}


# ---------------------------------------------------------------------------------------------
# The bench


def timed_prune(model: nn.Module, prune: Callable[[], Any], evaluation: dict[str, torch.Tensor],
                args: argparse.Namespace) -> dict[str, Any]:
    """Peak right before, prune seconds, load, sparsity of the prunable matrices and perplexity after."""
    gc.collect()
    release_freed_memory()  # neither side starts with the other's garbage
    peak = fp32_peak(repeats=3)
    load_now = load_average()
    start = time.perf_counter()
    prune()
    seconds = time.perf_counter() - start
    weights = [get_weight(m) for m in prunable_modules(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    ppl, _ = perplexity(model, evaluation, args)
    return {"s": seconds, "peak": peak, "load": load_now, "sparsity": zeros, "ppl": ppl}


def report(args: argparse.Namespace, dense_ppl: dict[str, float], rows: dict[str, dict[str, dict[str, Any]]],
           started: float, load_before: float) -> None:
    print(f"\nfedspallm reference bench: the original SparseGPT / Wanda pipelines against prune_sequential, "
          f"embedded SmolLM2-135M (float32), all blocks, unstructured {args.sparsity:.0%}")
    print(f"  {machine_line()}")
    print(f"  calibration: {args.nsamples} windows x {args.seqlen} tokens (default corpus, iid, seed {args.seed}); "
          f"reference: batch 1 as the originals; ours: batch {args.batch_size}")
    print(f"  perplexity: {args.eval_windows} x {args.eval_seqlen} windows; dense {dense_ppl['default']:.3f} (default), "
          f"{dense_ppl['pydoc']:.3f} (pydoc)")
    print("  s x pk = prune seconds x the fp32 matmul peak (GFLOP/s, best of A@B.T and A@B, n=2048) measured right "
          "before that prune")
    print()
    print(f"  {'method':<10}{'ref s':>8}{'ours s':>8}{'ours/ref':>10}{'ref ppl':>10}{'ours ppl':>10}{'ref s x pk':>12}"
          f"{'ours s x pk':>13}{'ours/ref':>10}")
    for method, row in rows.items():
        ref, ours = row["reference"], row["ours"]
        print(f"  {method:<10}{ref['s']:>8.1f}{ours['s']:>8.1f}{ours['s'] / ref['s']:>10.2f}{ref['ppl']['default']:>10.3f}"
              f"{ours['ppl']['default']:>10.3f}{ref['s'] * ref['peak']:>12.0f}{ours['s'] * ours['peak']:>13.0f}"
              f"{ours['s'] * ours['peak'] / (ref['s'] * ref['peak']):>10.2f}")
    print("  (ours/ref: issue 17's ratio, goal <= 0.50; the second one in s x pk, which discounts a change of load "
          "between the two runs)")
    print()
    print(f"  {'method':<10}{'side':<11}{'fp32 pk':>9}{'load':>6}{'sparsity':>10}{'ppl pydoc':>11}")
    for method, row in rows.items():
        for side, r in row.items():
            print(f"  {method:<10}{side:<11}{r['peak']:>9.1f}{r['load']:>6.1f}{r['sparsity']:>10.4%}"
                  f"{r['ppl']['pydoc']:>11.3f}")
    if "sparsegpt" in rows:
        print("  (the reference SparseGPT prunes one entry more than half of each 128-column tile, as the original does)")
    print()
    print(f"  {footer(started, load_before)}")
    print("summary: ours / reference prune time = " + "; ".join(
        f"{method} {row['ours']['s'] / row['reference']['s']:.2f} ({row['ours']['s']:.1f} / {row['reference']['s']:.1f} s, "
        f"ppl {row['ours']['ppl']['default']:.3f} / {row['reference']['ppl']['default']:.3f})"
        for method, row in rows.items()) + "; goal <= 0.50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration tokens per window")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (ours)")
    parser.add_argument("--eval-windows", type=int, default=8, help="windows of each evaluation text")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for option in ("nsamples", "seqlen", "batch_size", "eval_windows", "eval_seqlen", "eval_batch_size", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity {args.sparsity}: must be between 0 and 1 (exclusive)")
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()

    model, windows, evaluation = load(args)
    linears = prunable_modules(model)
    dense = {name: get_weight(linear).detach().clone() for name, linear in linears.items()}

    def restore() -> None:
        for name, linear in linears.items():
            set_weight(linear, dense[name])

    dense_ppl, _ = perplexity(model, evaluation, args)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for method in args.methods:
        restore()
        reference = timed_prune(model, lambda: REFERENCES[method](model, windows, args.sparsity), evaluation, args)
        print(f"[{time.perf_counter() - started:5.0f} s] {method} reference {reference['s']:.1f} s", file=sys.stderr,
              flush=True)
        restore()
        spec = PruneSpec(method, args.sparsity)
        ours = timed_prune(model, lambda: prune_sequential(model, windows, spec, batch_size=args.batch_size),
                           evaluation, args)
        print(f"[{time.perf_counter() - started:5.0f} s] {method} ours {ours['s']:.1f} s", file=sys.stderr, flush=True)
        rows[method] = {"reference": reference, "ours": ours}
    report(args, dense_ppl, rows, started, load_before)


if __name__ == "__main__":
    main()
