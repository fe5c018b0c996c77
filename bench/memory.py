"""Peak memory per process of the default run, against the model's own bytes, measured in one run.

    python bench/memory.py                        # the default 4-process run: about 5-8 minutes on the shared CPU
    python bench/memory.py --devices 2 -- --federation.strategy mask_vote

It launches ``fabric run --devices N fedspallm/main.py --config configs/default.yaml`` (extra
arguments after ``--`` go to the run) into a temporary output directory and reads its results.json:
``peak_rss_bytes_max_process`` (the largest peak resident set, VmHWM, over the processes: load,
calibration, aggregation, evaluation and export all included) and ``bytes.dense_model`` (the model's
parameters). It prints their ratio (the target is at most 2.5), the perplexity, the achieved
sparsity, and the sha256 of the exported model.safetensors, which a change of memory layout must not
change (the figure before the streaming aggregation: 377.666, sha256 56923ba1...).
"""

from __future__ import annotations

from common import MB, REPO, footer, launch_run, load_average, machine_line  # first: imports fedspallm before torch

import argparse
import json
import time

TARGET = 2.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("extra", nargs="*", help="arguments for the run (after --)")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), load_average()
    print(machine_line())
    results, digest, _ = launch_run(args.devices, args.config, args.extra)
    peak = results.get("peak_rss_bytes_max_process", results["peak_rss_bytes"])
    model = results["bytes"]["dense_model"]
    ratio = peak / model
    print(f"processes {results['world_size']}, strategy {results['strategy']}, rounds {results['rounds']}")
    print(f"model bytes {model / MB:.1f} MB; peak RSS per process (max over processes) {peak / MB:.1f} MB")
    print(f"peak RSS / model bytes = {ratio:.2f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")
    print(f"perplexity {json.dumps(results['perplexity'])}, sparsity {results['sparsity']['overall']:.4f}")
    print(f"model.safetensors sha256 {digest}")
    print(footer(started, load_before))


if __name__ == "__main__":
    main()
