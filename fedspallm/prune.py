"""The ``prune`` recipe: the driver of every strategy (federated, centralized, standalone) from one entry point.

It loads the model and data, builds the run's one reducer, runs the strategy's steps
(:func:`fedspallm.federated.driver.run_steps`), evaluates, and writes the run directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.fabric import Fabric

from fedspallm.allocator import release_freed_memory
from fedspallm.calibration import PruneSpec
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
from fedspallm.data import Corpora, eval_windows, plan_calibration
from fedspallm.federated.collectives import collective_report, make_reducer
from fedspallm.federated.driver import Step, StepLog, run_steps
from fedspallm.federated.faults import FaultInjection, RoundWatch
from fedspallm.federated.rounds import check_processes
from fedspallm.federated.strategies import RunContext, get_strategy
from fedspallm.lit import CausalLMModule, evaluate_perplexity
from fedspallm.models import (
    find_decoder_blocks,
    get_weight,
    load_model,
    prunable_modules,
    select_prunable,
    set_weight,
)
from fedspallm.outputs import (
    dense_zero_count,
    model_bytes,
    model_card,
    prunable_matrices,
    sparsity_report,
    write_run,
)
from fedspallm.placement import evaluation_device, load_device, place_whole
from fedspallm.preflight import check_lengths, preflight, validate_config
from fedspallm.reporting import RunReporter, tensorboard_logger
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
    """Prune a causal LM with one of the registered strategies (see --federation.strategy).

    Args:
        seed: seeds calibration sampling, client partitions, layer sampling and tie-breaks.
    """
    checks = preflight(seed, model, data, eval, pruning, federation, output, runtime)  # before any weights load
    quiet_libraries()
    started = time.perf_counter()
    fabric = make_fabric(runtime, federation.collective_timeout_s, loggers=[tensorboard_logger(output.dir)])
    cls = get_strategy(federation.strategy)
    if cls.clients_per_process:
        check_processes(fabric.world_size, federation.num_clients)
    torch.manual_seed(seed)
    reporter = RunReporter(fabric, output.dir, runtime.progress)
    # The run's one reducer: every cross-process sum goes through it (plain, or secure aggregation).
    reducer = make_reducer(fabric, secure=federation.secure_aggregation, seed=seed, bounds=federation.secure_bounds)

    loaded = load_model(model)
    net, tokenizer = loaded.model, loaded.tokenizer
    select_prunable(net, pruning.targets, pruning.ignore)
    net.to(load_device(fabric.device, pruning.offload))  # the placement rule: fedspallm.placement
    check_lengths(net, data, eval)
    eval_sets = {name: eval_windows(name, tokenizer, eval.seqlen, eval.max_windows, checks.corpora)
                 for name in eval.datasets}
    calibration = plan_calibration(data.calibration, tokenizer, data.nsamples, data.seqlen, federation.num_clients,
                                   data.partition, data.alpha, seed, checks.corpora)
    checks.corpora = Corpora()  # the texts are read no more (the plan keeps the token streams it indexes)
    n, m = pruning.n_m
    spec = PruneSpec(pruning.method, pruning.target_sparsity, n, m, pruning.blocksize, pruning.percdamp,
                     calibration_dtype=pruning.calibration_dtype)
    num_blocks = len(find_decoder_blocks(net))
    dense_zeros = dense_zero_count(net)
    release_freed_memory()  # what tokenizing and loading freed (fedspallm.allocator)
    load_s = time.perf_counter() - started
    module = CausalLMModule(net, eval_dtype=eval.dtype)
    prune_started = time.perf_counter()

    ctx = RunContext(net, spec, federation, calibration, seed=seed, rank=fabric.global_rank,
                     world_size=fabric.world_size, batch_size=runtime.batch_size, device=fabric.device,
                     offload=pruning.offload, checkpoint=loaded.source, fabric=fabric, eval_datasets=list(eval_sets),
                     evaluate_local=lambda _: evaluate_all(None, module, eval_sets, eval.batch_size, progress=False),
                     scratch=output.dir)
    strategy = cls(ctx, checks.plan)  # the plan preflight computed, when it could
    extra: dict[str, Any] = {}
    watch, on_step_end = None, None
    if cls.round_based:
        resume = start_from(checks.resume)
        if resume is not None:
            strategy.resume(resume)
        checkpointer = RoundCheckpointer(fabric, reporter.run_dir, fingerprint(seed, model, data, pruning, federation),
                                         federation.rounds, output.checkpoint)
        watch = RoundWatch.for_fabric(fabric, federation.num_clients, federation.rounds,
                                      federation.collective_timeout_s)

        def on_step_end(step: Step, log: StepLog) -> None:
            reporter.log_round(log, strategy.plan.samples[step.index], strategy.outcome.masks)
            if step.index < federation.rounds - 1:
                place_whole(net, evaluation_device(net, fabric.device, pruning.offload))
                ppl = evaluate_all(fabric, module, eval_sets, eval.batch_size, progress=False)
                reporter.log_metrics({f"perplexity/{k}": v for k, v in ppl.items()}, step=step.index)
            checkpointer.after_round(step.index, strategy.outcome)

    with reporter.steps("rounds" if cls.round_based else federation.strategy, len(strategy.steps()),
                        num_blocks) as hooks:
        def step_end(step: Step, log: StepLog) -> None:
            if on_step_end is not None:
                on_step_end(step, log)
            else:
                reporter.log_step(log)
            hooks.step_done()

        run_steps(strategy, reducer, watch=watch, faults=FaultInjection.from_config(federation),
                  on_client_block=hooks.client_block, on_step_end=step_end)
    place_whole(net, evaluation_device(net, fabric.device, pruning.offload))  # whole on one device: eval, export
    release_freed_memory()  # what the clients' passes and the aggregation freed (fedspallm.allocator)
    summary = strategy.summary()
    inner_eval_s = summary.pop("eval_s", 0.0)
    prune_s = time.perf_counter() - prune_started - inner_eval_s
    eval_started = time.perf_counter()
    if "perplexity" in summary:
        perplexity: dict[str, Any] = summary.pop("perplexity")
    else:
        perplexity = evaluate_all(fabric, module, eval_sets, eval.batch_size, runtime.progress)
        if federation.paired_aggregation is not None:
            extra["paired"] = _evaluate_paired(fabric, net, module, eval_sets, eval.batch_size, strategy, spec,
                                               federation.paired_aggregation)
    eval_s = time.perf_counter() - eval_started + inner_eval_s
    if cls.round_based:
        reporter.log_metrics({f"perplexity/{k}": v for k, v in perplexity.items()}, step=federation.rounds - 1)
        extra.update(summary)
        extra["checkpoint"] = str(checkpointer.path) if checkpointer.path else None
        extra["resumed_from"] = ({"checkpoint": output.resume, "completed_rounds": checks.resume["completed_rounds"]}
                                 if checks.resume else None)
    else:
        extra.update(summary)
    bytes_per_round = strategy.upload_per_client_per_round()

    sparsity = extra.pop("sparsity", None) or sparsity_report(net, spec.sparsity)
    results: dict[str, Any] = {
        "strategy": federation.strategy,
        "pruning": {"method": pruning.method, "sparsity": spec.sparsity, "pattern": pruning.pattern,
                    "calibration_dtype": pruning.calibration_dtype or model.dtype},  # the forwards' dtype used
        "num_clients": federation.num_clients,
        "rounds": federation.rounds,
        "seed": seed,
        "model": model.name_or_path,
        "dtype": model.dtype,
        "world_size": fabric.world_size,
        "federation": asdict(federation),
        "data": asdict(data),
        "eval": asdict(eval) | {"dtype": module.evaluation_dtype},
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
    results["secure_aggregation"] = federation.secure_aggregation
    results["collectives"] = collective_report(reducer, fabric.global_rank)
    if fabric.world_size > 1:
        peaks = torch.zeros(fabric.world_size, dtype=torch.int64)
        peaks[fabric.global_rank] = results["peak_rss_bytes"]
        peaks = reducer.sum({"peak_rss_bytes": peaks}, kind="metadata", tag="end")["peak_rss_bytes"]
        results["peak_rss_bytes_max_process"] = int(peaks.max())
    if fabric.global_rank == 0:
        exported = cls.exports_model  # standalone has one model per client, none global
        write_run(reporter.run_dir, results, environment_source=loaded.source, config_yaml=config_yaml, started=started,
                  model=net, tokenizer=tokenizer, card=pruned_model_card(results, config_yaml) if exported else None,
                  save_model=output.save_model and exported, save_compressed=output.save_compressed and exported)
        reporter.log_sparsity(results["sparsity"])
        if "communication" in results:
            reporter.log_communication(results["communication"])
        reporter.summary(results)
        reporter.close()
    fabric.barrier()
    return results


def pruned_model_card(results: dict[str, Any], config_yaml: str) -> str:
    perplexity = [f"| {name} | {value['mean'] if isinstance(value, dict) else value:.3f} |"
                  for name, value in results["perplexity"].items()]
    per_matrix = [f"| {name} | {value:.4f} |" for name, value in results["sparsity"]["per_matrix"].items()]
    facts = [f"pruner: {results['pruning']['method']}, pattern {results['pruning']['pattern']}, target sparsity "
             f"{results['sparsity']['target']:.4f}, achieved {results['sparsity']['overall']:.4f}",
             f"clients: {results['num_clients']}, rounds: {results['rounds']}, seed: {results['seed']}"]
    return model_card(f"Pruned with fedspallm ({results['strategy']})", ["pruning", "sparse", "fedspallm"], facts,
                      {"Perplexity": ["| dataset | perplexity |", "|---|---|", *perplexity],
                       "Per-layer sparsity": ["| matrix | sparsity |", "|---|---|", *per_matrix]}, config_yaml)


def _evaluate_paired(fabric: Fabric, net: torch.nn.Module, module: CausalLMModule, eval_sets: dict[str, torch.Tensor],
                     batch_size: int, strategy: Any, spec: PruneSpec, method: str) -> dict[str, Any]:
    """Perplexity and sparsity of the model the other aggregation rule makes of the same uploads; the model
    is left as it was (the primary aggregate is what gets exported)."""
    layers = prunable_modules(net)
    alternative = strategy.paired_weights(method)
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
