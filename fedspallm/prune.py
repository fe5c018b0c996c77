"""The ``prune`` recipe: centralized, standalone and federated pruning from one entry point."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.fabric import Fabric

from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.checkpoint import RoundCheckpointer, fingerprint, start_from
from fedspallm.config import (
    DataConfig,
    EvalConfig,
    FederationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
)
from fedspallm.data import eval_windows, plan_calibration
from fedspallm.errors import UserError
from fedspallm.federated.faults import RoundWatch
from fedspallm.federated.rounds import FederationOutcome, clients_of_rank, paired_weights, plan_rounds, run_federation
from fedspallm.lit import CausalLMModule, evaluate_perplexity
from fedspallm.models import find_decoder_blocks, get_weight, load_model, prunable_modules, set_weight
from fedspallm.outputs import (
    atomic_write_json,
    dense_zero_count,
    export_hf,
    model_bytes,
    model_card,
    prunable_matrices,
    sparsity_report,
)
from fedspallm.preflight import check_lengths, preflight, same_on_every_rank, validate_config
from fedspallm.reporting import RunReporter
from fedspallm.runtime import make_fabric, peak_rss_bytes, quiet_libraries


def validate_all(model: ModelConfig, data: DataConfig, eval: EvalConfig, pruning: PruningConfig,
                 federation: FederationConfig, output: OutputConfig, runtime: RuntimeConfig) -> None:
    """Every config value and the rules between them (no files opened); see :mod:`fedspallm.preflight`."""
    validate_config(model, data, eval, pruning, federation, output, runtime)



def evaluate_all(fabric: Fabric | None, module: CausalLMModule, sets: dict[str, torch.Tensor], batch_size: int,
                 progress: bool) -> dict[str, float]:
    return {name: evaluate_perplexity(fabric, module, windows, batch_size, description=f"eval {name}", progress=progress)
            for name, windows in sets.items()}


def prune(
    seed: int = 0,
    model: ModelConfig = ModelConfig(),
    data: DataConfig = DataConfig(),
    eval: EvalConfig = EvalConfig(),
    pruning: PruningConfig = PruningConfig(),
    federation: FederationConfig = FederationConfig(),
    output: OutputConfig = OutputConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    config_yaml: str = "",
) -> dict[str, Any]:
    """Prune a causal LM: federated (fedspallm, fedavg, mask_vote), centralized or standalone.

    Args:
        seed: seeds calibration sampling, client partitions, layer sampling and tie-breaks.
    """
    checks = preflight(seed, model, data, eval, pruning, federation, output, runtime)  # before any weights load
    quiet_libraries()
    started = time.perf_counter()
    fabric = make_fabric(runtime, federation.collective_timeout_s)
    strategy = federation.strategy
    if strategy != "centralized" and fabric.world_size > federation.num_clients:
        raise same_on_every_rank(UserError(
            f"{fabric.world_size} processes but federation.num_clients={federation.num_clients}: every process "
            "needs at least one client; launch fewer devices or add clients"
        ))
    torch.manual_seed(seed)
    reporter = RunReporter(fabric, output.dir, runtime.progress)

    loaded = load_model(model)
    net, tokenizer = loaded.model, loaded.tokenizer
    if not pruning.offload:
        net.to(fabric.device)
    check_lengths(net, data, eval)
    eval_sets = {name: eval_windows(name, tokenizer, eval.seqlen, eval.max_windows) for name in eval.datasets}
    calibration = plan_calibration(data.calibration, tokenizer, data.nsamples, data.seqlen, federation.num_clients,
                                   data.partition, data.alpha, seed)
    n, m = pruning.n_m
    spec = PruneSpec(pruning.method, pruning.target_sparsity, n, m, pruning.blocksize, pruning.percdamp)
    num_blocks = len(find_decoder_blocks(net))
    dense_zeros = dense_zero_count(net)
    load_s = time.perf_counter() - started
    module = CausalLMModule(net)
    prune_started = time.perf_counter()
    extra: dict[str, Any] = {}
    bytes_per_round: list[list[int]] = []
    plan = None

    if strategy == "centralized":
        if fabric.global_rank == 0:
            windows = calibration.all_windows()
            with reporter.blocks(f"{pruning.method} (centralized)", num_blocks) as advance:
                prune_sequential(net, windows, spec, batch_size=runtime.batch_size, device=fabric.device,
                                 offload=pruning.offload, on_block=advance)
        _broadcast_pruned(fabric, net)
        prune_s = time.perf_counter() - prune_started
        eval_started = time.perf_counter()
        perplexity: dict[str, Any] = evaluate_all(fabric, module, eval_sets, eval.batch_size, runtime.progress)
        eval_s = time.perf_counter() - eval_started
    elif strategy == "standalone":
        evaluated = standalone_clients(federation.num_clients, federation.standalone_clients, seed)
        my_clients = [c for c in clients_of_rank(federation.num_clients, fabric.world_size, fabric.global_rank)
                      if c in evaluated]
        windows = calibration.materialize(my_clients)
        dense_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        scores = torch.zeros(federation.num_clients, len(eval_sets), dtype=torch.float64)
        eval_s = 0.0
        for client_id in my_clients:
            with reporter.blocks(f"client {client_id} (standalone)", num_blocks) as advance:
                prune_sequential(net, windows[client_id], spec, batch_size=runtime.batch_size, device=fabric.device,
                                 offload=pruning.offload, on_block=advance)
            if client_id == evaluated[0]:
                extra["sparsity"] = sparsity_report(net, spec.sparsity)  # every client prunes to the same target
            eval_started = time.perf_counter()
            local = evaluate_all(None, module, eval_sets, eval.batch_size, progress=False)
            eval_s += time.perf_counter() - eval_started
            scores[client_id] = torch.tensor(list(local.values()), dtype=torch.float64)
            net.load_state_dict(dense_state)
        if fabric.world_size > 1:
            scores = fabric.all_reduce(scores, reduce_op="sum")
            owner = next(r for r in range(fabric.world_size)
                         if evaluated[0] in clients_of_rank(federation.num_clients, fabric.world_size, r))
            extra["sparsity"] = fabric.broadcast(extra.get("sparsity"), src=owner)
        perplexity = {}
        for j, name in enumerate(eval_sets):
            col = scores[evaluated, j].tolist()
            perplexity[name] = {"mean": sum(col) / len(col), "min": min(col), "max": max(col), "per_client": col,
                                "clients": evaluated}
        prune_s = time.perf_counter() - prune_started - eval_s
    else:
        plan = plan_rounds(federation, num_blocks, seed)
        my_clients = clients_of_rank(federation.num_clients, fabric.world_size, fabric.global_rank)
        windows = calibration.materialize(my_clients)

        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            return fabric.all_reduce(tensor, reduce_op="sum") if fabric.world_size > 1 else tensor

        resume = start_from(checks.resume, reporter.bytes_per_round, reporter.client_seconds_per_round)
        checkpointer = RoundCheckpointer(fabric, reporter.run_dir, fingerprint(seed, model, data, pruning, federation),
                                         federation.rounds, reporter.bytes_per_round, output.checkpoint,
                                         reporter.client_seconds_per_round)

        def round_end(t: int, outcome: FederationOutcome) -> None:
            reporter.log_round(t, outcome, plan, federation.num_clients, reduce)
            if t < federation.rounds - 1 and federation.rounds > 1:
                ppl = evaluate_all(fabric, module, eval_sets, eval.batch_size, progress=False)
                reporter.log_metrics({f"perplexity/{k}": v for k, v in ppl.items()}, step=t)
            checkpointer.after_round(t, outcome)

        watch = RoundWatch.for_fabric(fabric, federation.num_clients, federation.rounds, federation.collective_timeout_s)
        with reporter.rounds(federation.rounds, len(my_clients), num_blocks) as hooks:
            outcome = run_federation(
                net, windows, spec, federation, plan, reduce, seed=seed, batch_size=runtime.batch_size,
                device=fabric.device, offload=pruning.offload,
                on_round_end=lambda t, o: (round_end(t, o), hooks.round_done()),
                on_client_block=hooks.client_block, watch=watch, resume=resume,
            )
        bytes_per_round = reporter.bytes_per_round
        extra["client_seconds_per_round"] = reporter.client_seconds_per_round
        extra["collective_time_s"] = outcome.collective_time_s
        extra["uncovered_blocks"] = outcome.uncovered
        extra["samples"] = plan.samples
        extra["blocks_per_client"] = plan.blocks_per_client
        extra["budgets"] = plan.budgets
        extra["checkpoint"] = str(checkpointer.path) if checkpointer.path else None
        extra["resumed_from"] = ({"checkpoint": output.resume, "completed_rounds": checks.resume["completed_rounds"]}
                                 if checks.resume else None)
        prune_s = time.perf_counter() - prune_started
        eval_started = time.perf_counter()
        perplexity = evaluate_all(fabric, module, eval_sets, eval.batch_size, runtime.progress)
        if federation.paired_aggregation is not None:
            extra["paired"] = _evaluate_paired(fabric, net, module, eval_sets, eval.batch_size, outcome, federation,
                                               spec)
        eval_s = time.perf_counter() - eval_started
        reporter.log_metrics({f"perplexity/{k}": v for k, v in perplexity.items()}, step=federation.rounds - 1)

    sparsity = extra.pop("sparsity", None) or sparsity_report(net, spec.sparsity)
    results: dict[str, Any] = {
        "strategy": strategy,
        "pruning": {"method": pruning.method, "sparsity": spec.sparsity, "pattern": pruning.pattern},
        "num_clients": federation.num_clients,
        "rounds": federation.rounds,
        "seed": seed,
        "model": model.name_or_path,
        "dtype": model.dtype,
        "world_size": fabric.world_size,
        "federation": asdict(federation),
        "data": asdict(data),
        "eval": asdict(eval),
        "perplexity": perplexity,
        "sparsity": sparsity,
        "dense_zeros": dense_zeros,
        "bytes": {
            "upload_per_client_per_round": bytes_per_round,
            "dense_model": model_bytes(net),
            "dense_prunable": sum(w.numel() * w.element_size() for w in prunable_matrices(net).values()),
        },
        "wall_time_s": time.perf_counter() - started,
        "timings": {"load_s": load_s, "prune_s": prune_s, "eval_s": eval_s},
        "peak_rss_bytes": peak_rss_bytes(),
        **extra,
    }
    peaks = fabric.all_reduce(torch.tensor([results["peak_rss_bytes"]], dtype=torch.float64), reduce_op="max") \
        if fabric.world_size > 1 else None
    if peaks is not None:
        results["peak_rss_bytes_max_process"] = int(peaks.item())
    if fabric.global_rank == 0:
        run_dir = reporter.run_dir
        results["model_dir"] = None
        if output.save_model and strategy != "standalone":  # standalone has one model per client, none global
            card = model_card(results, config_yaml)
            results["model_dir"] = str(export_hf(net, tokenizer, run_dir / "model", card))
        if output.save_compressed and strategy != "standalone":
            from fedspallm.compressed import save_compressed

            path = save_compressed(net, run_dir / "model_compressed.safetensors")
            results["compressed_path"] = str(path)
        results["wall_time_s"] = time.perf_counter() - started
        atomic_write_json(run_dir / "results.json", results)
        if config_yaml:
            (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
        reporter.log_sparsity(results["sparsity"])
        reporter.summary(results)
        reporter.close()
    fabric.barrier()
    return results


def _evaluate_paired(fabric: Fabric, net: torch.nn.Module, module: CausalLMModule, eval_sets: dict[str, torch.Tensor],
                     batch_size: int, outcome: FederationOutcome, federation: FederationConfig,
                     spec: PruneSpec) -> dict[str, Any]:
    """Perplexity and sparsity of the model the other aggregation rule makes of the same uploads; the model
    is left as it was (the primary aggregate is what gets exported)."""
    method = federation.paired_aggregation
    layers = prunable_modules(net)
    alternative = paired_weights(outcome, federation, spec, method, next(net.parameters()).dtype)
    primary = {name: get_weight(layers[name]).detach().clone() for name in alternative}
    for name, weight in alternative.items():
        set_weight(layers[name], weight)
    try:
        perplexity = evaluate_all(fabric, module, eval_sets, batch_size, progress=False)
        overall = sparsity_report(net, spec.sparsity)["overall"]
    finally:
        for name, weight in primary.items():
            set_weight(layers[name], weight)
    return {"aggregation": method, "perplexity": perplexity, "sparsity_overall": overall}


def standalone_clients(num_clients: int, sample: int | None, seed: int) -> list[int]:
    """The clients a standalone run prunes: all of them, or ``sample`` of them drawn with the seed."""
    if sample is None or sample >= num_clients:
        return list(range(num_clients))
    return sorted(random.Random(f"fedspallm/standalone/{seed}").sample(range(num_clients), sample))


def _broadcast_pruned(fabric: Fabric, net: torch.nn.Module) -> None:
    """Centralized pruning runs on rank 0; the others need the same weights for data-parallel evaluation."""
    if fabric.world_size == 1:
        return
    for layer in prunable_modules(net).values():
        torch.distributed.broadcast(layer.weight.data, src=0)
