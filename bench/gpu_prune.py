"""A timed prune of the embedded default model on one GPU, with its peak GPU memory. Needs CUDA.

    python bench/gpu_prune.py                       # SparseGPT 70%, offload off and on
    python bench/gpu_prune.py --method wanda --dtype bfloat16

Setting: the embedded SmolLM2-135M in ``--dtype``, ``--nsamples`` windows x ``--seqlen`` tokens drawn by
``plan_calibration("default", ..., partition="iid", seed=0)`` as the ``centralized`` strategy draws them,
all 30 blocks pruned by ``prune_sequential`` (the engine every strategy runs). For each placement
(offload false: the whole model on the GPU; true: one block at a time, the rest on the host), in a
fresh CUDA memory state: the prune's wall time (synchronised), calibration tokens/s, the peak GPU
memory allocated by torch during the prune (``torch.cuda.max_memory_allocated``, from after the load),
and the perplexity of the pruned model on 8 test windows of 512 tokens, evaluated on the GPU. The two
placements must give the same masks; the bench says whether they did. Nothing here runs without CUDA.
"""

from __future__ import annotations

from common import MB, footer, load_average, machine_line  # first: imports fedspallm before torch

import argparse
import sys
import time

import torch

from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.config import ModelConfig
from fedspallm.data import eval_windows, plan_calibration
from fedspallm.lit import CausalLMModule, evaluate_perplexity
from fedspallm.models import load_model, prunable_modules
from fedspallm.placement import devices_of, evaluation_device, load_device, place_whole
from fedspallm.runtime import quiet_libraries


def run(args: argparse.Namespace, offload: bool) -> dict:
    device = torch.device("cuda", 0)
    loaded = load_model(ModelConfig(dtype=args.dtype))
    net = loaded.model.to(load_device(device, offload))
    windows = plan_calibration("default", loaded.tokenizer, args.nsamples, args.seqlen, 1, "iid", 0.5, 0).all_windows()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    prune_sequential(net, windows, PruneSpec(args.method, args.sparsity), batch_size=args.batch_size, device=device,
                     offload=offload)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device)
    place_whole(net, evaluation_device(net, device, offload))
    assert len(devices_of(net)) == 1
    tests = eval_windows("default", loaded.tokenizer, 512, 8)
    ppl = evaluate_perplexity(None, CausalLMModule(net), tests, batch_size=4, progress=False)
    masks = {name: (layer.weight != 0).cpu() for name, layer in prunable_modules(net).items()}
    return {"seconds": seconds, "tokens_per_s": windows.numel() / seconds, "peak": peak, "resident": resident,
            "ppl": ppl, "masks": masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    bench_started, load_before = time.perf_counter(), load_average()
    if not torch.cuda.is_available():
        print("skipped: bench/gpu_prune.py needs a CUDA device and none is available here", file=sys.stderr)
        return
    quiet_libraries()
    print(machine_line())
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / MB:.0f} MB")
    print(f"{args.method} {args.sparsity:.0%}, {args.dtype}, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"batch {args.batch_size}")
    print(f"{'offload':>8} {'prune s':>8} {'tok/s':>9} {'GPU before MB':>14} {'peak GPU MB':>12} {'ppl':>10}")
    results = {}
    for offload in (False, True):
        r = results[offload] = run(args, offload)
        print(f"{str(offload).lower():>8} {r['seconds']:8.2f} {r['tokens_per_s']:9.0f} {r['resident'] / MB:14.1f} "
              f"{r['peak'] / MB:12.1f} {r['ppl']:10.3f}")
        torch.cuda.empty_cache()
    same = all(torch.equal(results[False]["masks"][n], results[True]["masks"][n]) for n in results[False]["masks"])
    print(f"masks identical with and without offload: {same}")
    print(footer(bench_started, load_before))


if __name__ == "__main__":
    main()
