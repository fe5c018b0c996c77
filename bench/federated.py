"""FedSpaLLM and fedstats against centralized SparseGPT on the same calibration windows, measured in one run.

    python bench/federated.py                  # about 6-9 minutes on the shared 2-core CPU

Setting (the defaults): the embedded SmolLM2-135M in float32; SparseGPT at unstructured 50%;
``--nsamples`` 16 windows x ``--seqlen`` 256 tokens drawn by
``plan_calibration("default", ..., num_clients=4, partition="iid", seed=0)``; FedSpaLLM with 4
clients, uniform budget r = 0.5 (k = 15 of 30 blocks each), systematic sampling, l0 aggregation with
mask expansion, 1 round; the ``centralized`` strategy prunes all 30 blocks on the union of the same 16
windows (SparseGPT from the fixed-point sum of its batches' statistics); fedstats with the same 4
clients (``--fedstats-sampling all``: every client adds statistics to every block, so the result is
centralized's bit for bit: the masks line says so). Perplexity on 8 x 512 test windows. Calibration batch 8.

Layout: ONE process, 4 virtual clients, run one after another by ``run_federation`` with a
one-process ``PlainReducer`` (the sum is the input), so both runs get the same 2 cores and nothing else of this
bench runs beside them. Consequences, stated in the output:

- the federated wall time is the *sum* of the clients' work; with one process per client on
  equal devices the round would take about the slowest client plus aggregation, and that
  critical path is printed as well;
- ``collective_time_s`` covers building the sums that would be all-reduced; no bytes cross a
  process boundary here. The payload such a process would all-reduce per round
  (float64 sum of kept weights + int32 keep counts for every matrix of the round's blocks, plus
  the contributor counts) is printed next to the upload bytes.

Upload bytes are ``results.json``'s ``upload_per_client_per_round``: each client's pruned blocks as a
bitmask plus the kept values in the model dtype. They are compared with a dense upload of the whole
model (every parameter once, ``bytes.dense_model``) and of the same blocks.
"""

from __future__ import annotations

from common import MB, footer, load_average, machine_line  # first: imports fedspallm before torch

import argparse
import datetime
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fedspallm.federated.rounds as rounds
from fedspallm.calibration import PruneSpec
from fedspallm.config import FederationConfig, ModelConfig
from fedspallm.data import eval_windows, plan_calibration
from fedspallm.federated.collectives import PlainReducer
from fedspallm.federated.driver import run_steps
from fedspallm.federated.strategies import RunContext, get_strategy
from fedspallm.lit import CausalLMModule, evaluate_perplexity
from fedspallm.models import find_decoder_blocks, get_weight, load_model, prunable_modules, set_weight
from fedspallm.outputs import model_bytes
from fedspallm.runtime import quiet_libraries


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)


def _allreduce_rank(rank: int, world: int, port: int, shapes: list[tuple[int, ...]], out: Any) -> None:
    """One rank of the loopback reduce: the same kinds, sizes and dtypes the round strategies sum, through
    the same :class:`PlainReducer` (one all_reduce per same-dtype bucket)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        reducer = PlainReducer()
        sums = {"weight_sum": {str(i): torch.zeros(shape, dtype=torch.float64) for i, shape in enumerate(shapes)},
                "keep_count": {str(i): torch.zeros(shape, dtype=torch.int32) for i, shape in enumerate(shapes)},
                "contributors": {str(i): torch.zeros(1, dtype=torch.int64) for i in range(len(shapes))}}
        dist.barrier()
        start = time.perf_counter()
        for kind, tensors in sums.items():
            reducer.sum(tensors, kind=kind, tag="round 1")
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put(float(seconds.item()))
    finally:
        dist.destroy_process_group()


def loopback_allreduce_seconds(shapes: list[tuple[int, ...]], world: int) -> float:
    """Wall time of one round's all-reduce with ``world`` gloo processes on 127.0.0.1 (slowest rank)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    mp.start_processes(_allreduce_rank, args=(world, port, shapes, out), nprocs=world, join=True, start_method="spawn")
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows, over all clients")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fedstats-sampling", default="all", choices=("all", "systematic", "uniform"),
                        help="fedstats' layer sampling (all: every client adds statistics to every block)")
    parser.add_argument("--allreduce-ranks", type=int, default=2,
                        help="gloo processes for the loopback all-reduce measurement (0 skips it)")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), load_average()
    quiet_libraries()

    loaded = load_model(ModelConfig(dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    num_blocks = len(find_decoder_blocks(model))
    calibration = plan_calibration("default", tokenizer, args.nsamples, args.seqlen, args.clients, "iid", 0.5,
                                   args.seed)
    evaluation = eval_windows("default", tokenizer, args.eval_seqlen, args.eval_windows)
    spec = PruneSpec("sparsegpt", args.sparsity)
    layers = prunable_modules(model)
    dense = {name: get_weight(layer).detach().clone() for name, layer in layers.items()}
    dense_model_bytes = model_bytes(model)

    def perplexity() -> float:
        return evaluate_perplexity(None, CausalLMModule(model), evaluation, args.eval_batch_size, progress=False)

    # The centralized strategy: SparseGPT on the union of the clients' windows
    log(started, "centralized SparseGPT ...")
    cfg = FederationConfig(strategy="centralized", num_clients=args.clients)
    centralized = get_strategy("centralized")(RunContext(model, spec, cfg, calibration, seed=args.seed,
                                                         batch_size=args.batch_size))
    start = time.perf_counter()
    run_steps(centralized, PlainReducer())
    central_s = time.perf_counter() - start
    central_ppl = perplexity()
    central_masks = {name: get_weight(layer) != 0 for name, layer in layers.items()}
    for name, layer in layers.items():
        set_weight(layer, dense[name])

    # fedstats, the same virtual clients: statistics summed block by block, the block pruned from the sum
    log(started, f"fedstats, {args.clients} virtual clients, sampling {args.fedstats_sampling} ...")
    cfg = FederationConfig(strategy="fedstats", num_clients=args.clients, budgets="uniform", budget=args.budget,
                           sampling=args.fedstats_sampling)
    fedstats = get_strategy("fedstats")(RunContext(model, spec, cfg, calibration, seed=args.seed,
                                                   batch_size=args.batch_size))
    start = time.perf_counter()
    run_steps(fedstats, PlainReducer())
    fedstats_s = time.perf_counter() - start
    fedstats_ppl = perplexity()
    agree = sum(int((get_weight(layer) != 0).eq(central_masks[name]).sum()) for name, layer in layers.items())
    fedstats_masks = agree / sum(mask.numel() for mask in central_masks.values())
    fedstats_codec_s = sum(log.aggregate_time_s for log in fedstats.logs)
    fedstats_sent = fedstats.summary()["communication"]["upload_per_client"]
    for name, layer in layers.items():
        set_weight(layer, dense[name])

    # FedSpaLLM, virtual clients in this process
    log(started, f"FedSpaLLM, {args.clients} virtual clients ...")
    cfg = FederationConfig(strategy="fedspallm", num_clients=args.clients, rounds=args.rounds, budgets="uniform",
                           budget=args.budget)
    plan = rounds.plan_rounds(cfg, num_blocks, args.seed)
    client_windows = calibration.materialize(range(args.clients))
    start = time.perf_counter()
    outcome = rounds.run_federation(model, client_windows, spec, cfg, plan, PlainReducer(), seed=args.seed,
                                    batch_size=args.batch_size)
    fed_s = time.perf_counter() - start
    log(started, "evaluating ...")
    fed_ppl = perplexity()
    round_names = list(prunable_modules(model, sorted({b for blocks in plan.samples[0] for b in blocks})))
    allreduce_s = None
    if args.allreduce_ranks > 1:
        log(started, f"loopback all-reduce, {args.allreduce_ranks} gloo processes ...")
        allreduce_s = loopback_allreduce_seconds([tuple(dense[n].shape) for n in round_names], args.allreduce_ranks)

    # Timings. StepLog.client_time_s is the local work: each client prunes and adds its upload to the local sums.
    logs = outcome.rounds
    client_s = {(r.index, c): r.client_seconds[c] for r in logs for c in range(args.clients)}
    local_s = sum(r.client_time_s for r in logs)
    clients_s = sum(client_s.values())
    sums_s = local_s - clients_s
    aggregate_s = sum(r.aggregate_time_s for r in logs)
    collective_s = outcome.collective_time_s
    other_s = fed_s - local_s - aggregate_s - collective_s
    server_s = aggregate_s + collective_s
    # With one process per client, a round lasts as long as its slowest client, then that client's own
    # sums, the all-reduce and the aggregation (every process computes the same one).
    slowest = sum(max(client_s[(r.index, c)] for c in range(args.clients)) for r in logs)
    parallel_s = slowest + sums_s / args.clients + collective_s + aggregate_s + other_s + (allreduce_s or 0.0) * len(logs)

    # Bytes
    per_round = [r.upload_bytes for r in logs]
    mean_upload = statistics.mean(v for row in per_round for v in row)
    names_of = {b: list(prunable_modules(model, [b])) for b in range(num_blocks)}
    bytes_of = {b: sum(dense[n].numel() * dense[n].element_size() for n in names_of[b]) for b in range(num_blocks)}
    samples = plan.samples[0]
    round_blocks = sorted({b for blocks in samples for b in blocks})
    payload = sum(dense[n].numel() * (8 + 4) + 8 for n in round_names)

    print(f"\nfedspallm federated bench: embedded SmolLM2-135M (float32), SparseGPT unstructured {args.sparsity:.0%}")
    print(f"  {machine_line()}")
    print(f"  calibration: {args.nsamples} windows x {args.seqlen} tokens (default corpus, iid, seed {args.seed}), batch "
          f"{args.batch_size}; FedSpaLLM: {args.clients} clients x {sum(len(w) for w in client_windows.values()) // args.clients}"
          f" windows, budget {args.budget} -> k = {plan.blocks_per_client[0]} of {num_blocks} blocks, systematic, "
          f"l0 + expansion, {args.rounds} round(s)")
    print(f"  layout: 1 process, {args.clients} virtual clients run one after another, one-process reducer (no process "
          "boundary is crossed)")
    print()
    print(f"  {'run':<40}{'seconds':>9}{'share':>8}{'ppl':>10}")
    print(f"  {'centralized SparseGPT (all blocks)':<40}{central_s:>9.1f}{'':>8}{central_ppl:>10.2f}")
    print(f"  {'FedSpaLLM, whole run_federation':<40}{fed_s:>9.1f}{1.0:>8.1%}{fed_ppl:>10.2f}")
    for c in range(args.clients):
        seconds = sum(client_s[(r.index, c)] for r in logs)
        print(f"  {f'  client {c} ({len(samples[c])} blocks, {client_windows[c].shape[0]} windows)':<40}"
              f"{seconds:>9.1f}{seconds / fed_s:>8.1%}")
    for label, seconds in (("  local sums of the clients' uploads", sums_s),
                           ("  collective (build + sum contributions)", collective_s),
                           ("  aggregation (l0 average + expansion)", aggregate_s),
                           ("  other (dense copy, load global, ...)", other_s)):
        print(f"  {label:<40}{seconds:>9.2f}{seconds / fed_s:>8.2%}")
    if allreduce_s is not None:
        print(f"  {f'  all-reduce, {args.allreduce_ranks} gloo processes, loopback':<40}{allreduce_s:>9.2f}"
              f"{allreduce_s / fed_s:>8.2%}   (measured apart: not part of the run above)")
    print(f"  {f'fedstats, sampling {args.fedstats_sampling}':<40}{fedstats_s:>9.1f}{'':>8}{fedstats_ppl:>10.2f}"
          f"   (x{fedstats_s / central_s:.2f} centralized; masks {fedstats_masks:.4%} equal to centralized's;"
          f" decode + prune {fedstats_codec_s:.1f} s; {statistics.mean(fedstats_sent) / MB:.1f} MB sent per client)")
    print(f"  {'FedSpaLLM critical path, 1 client/process':<40}{parallel_s:>9.1f}{'':>8}   (slowest client + its sums"
          " + all-reduce + aggregation)")
    print()
    print(f"  upload per client, round 1 (bitmask + kept fp32 values) vs dense (whole model {dense_model_bytes / MB:.1f} MB):")
    print(f"    {'client':<8}{'blocks':>7}{'upload MB':>11}{'/ dense model':>15}{'dense same blocks MB':>22}"
          f"{'/ same blocks':>15}")
    for c in range(args.clients):
        sent, same = per_round[0][c], sum(bytes_of[b] for b in samples[c])
        print(f"    {c:<8}{len(samples[c]):>7}{sent / MB:>11.1f}{sent / dense_model_bytes:>15.3f}{same / MB:>22.1f}"
              f"{sent / same:>15.3f}")
    print(f"    all-reduce payload per process in round 1 (float64 sums + int32 counts over {len(round_blocks)} blocks): "
          f"{payload / MB:.1f} MB = {payload / mean_upload:.1f}x the mean upload")
    print()
    print(f"  {footer(started, load_before)}")
    overhead = server_s + (allreduce_s or 0.0) * len(logs)
    print(f"summary: FedSpaLLM / centralized wall time = {fed_s / central_s:.2f} (serial virtual clients), "
          f"{parallel_s / central_s:.2f} (critical path, 1 client/process); collective + aggregation = "
          f"{server_s / fed_s:.1%} of the federated run in-process, {overhead / parallel_s:.1%} of the critical path "
          f"with the loopback all-reduce; upload / dense model = {mean_upload / dense_model_bytes:.3f} per "
          f"client per round; ppl FedSpaLLM / centralized = {fed_ppl / central_ppl:.2f}; fedstats / centralized "
          f"wall time = {fedstats_s / central_s:.2f}, ppl = {fedstats_ppl / central_ppl:.4f}")


if __name__ == "__main__":
    main()
