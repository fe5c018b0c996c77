"""The ``validate`` / ``test`` recipe: perplexity of any model on any corpus, data-parallel over processes."""

from __future__ import annotations

import time
from typing import Any

import torch

from fedspallm.config import EvalConfig, ModelConfig, OutputDirConfig, RuntimeConfig
from fedspallm.data import eval_windows
from fedspallm.lit import CausalLMModule, evaluate_perplexity
from fedspallm.models import load_model
from fedspallm.outputs import sparsity_report, write_run
from fedspallm.preflight import check_context
from fedspallm.reporting import RunReporter
from fedspallm.runtime import make_fabric, quiet_libraries


def validate(
    seed: int = 0,
    model: ModelConfig = ModelConfig(),
    eval: EvalConfig = EvalConfig(),
    output: OutputDirConfig = OutputDirConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    config_yaml: str = "",
) -> dict[str, Any]:
    """Evaluate perplexity (exp of the mean token NLL over non-overlapping windows). results.json,
    config.yaml and TensorBoard events go to output.dir/version_N.

    Args:
        seed: seeds torch, as in every subcommand (the evaluation itself draws nothing at random:
            it takes the first eval.max_windows windows).
    """
    quiet_libraries()
    started = time.perf_counter()
    fabric = make_fabric(runtime)
    torch.manual_seed(seed)
    loaded = load_model(model)
    net = loaded.model.to(fabric.device)
    check_context(net, {"eval.seqlen": eval.seqlen})
    reporter = RunReporter(fabric, output.dir, runtime.progress)
    module = CausalLMModule(net, eval_dtype=eval.dtype)
    perplexity = {}
    windows_used = {}
    for name in eval.datasets:
        windows = eval_windows(name, loaded.tokenizer, eval.seqlen, eval.max_windows)
        windows_used[name] = int(windows.shape[0])
        perplexity[name] = evaluate_perplexity(fabric, module, windows, eval.batch_size, description=f"eval {name}",
                                               progress=runtime.progress)
    results = {
        "strategy": "dense-eval",
        "model": model.name_or_path,
        "seed": seed,
        "dtype": model.dtype,
        "perplexity": perplexity,
        "eval": {"seqlen": eval.seqlen, "windows": windows_used, "dtype": module.evaluation_dtype},
        "sparsity": sparsity_report(net, 0.0),
    }
    if fabric.global_rank == 0:
        reporter.log_metrics({f"perplexity/{k}": v for k, v in perplexity.items()}, step=0)
        write_run(reporter.run_dir, results, environment_source=loaded.source, config_yaml=config_yaml, started=started)
        for name, value in perplexity.items():
            print(f"{name}: perplexity {value:.4f} over {windows_used[name]} windows of {eval.seqlen} tokens")
        print(f"run directory: {reporter.run_dir}")
        reporter.close()
    return results


# LightningCLI names the same evaluation both ways.
test = validate
