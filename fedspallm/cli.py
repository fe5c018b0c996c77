"""The ``fedspallm`` command: LightningCLI-style subcommands driven by typed signatures (jsonargparse).

    fedspallm prune    --config configs/default.yaml --pruning.sparsity 0.8
    fedspallm validate --model.name_or_path lightning_logs/version_0/model --output.dir evals
    fedspallm prune    --print_config > my.yaml

Every subcommand that runs a model (``prune``, ``validate``/``test``, ``fit``) takes the same
``--config``, ``--print_config``, ``--seed``, ``--model.*``, ``--eval.*``, ``--runtime.*`` and
``--output.dir``, with the same meaning. Errors in the user's input print one ``error: ...`` line and
exit with status 2: jsonargparse's own message for types and choices, the config's for values.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from fedspallm.errors import UserError

INTERNAL = {"config_yaml"}


def _commands() -> dict[str, tuple[Callable[..., Any], str]]:
    from fedspallm.evaluate import test, validate
    from fedspallm.finetune import finetune
    from fedspallm.plot import plot
    from fedspallm.prune import prune

    return {
        "prune": (prune, "Prune a model: federated (fedspallm, fedavg, mask_vote), centralized or standalone."),
        "validate": (validate, "Perplexity of a model (dense or pruned) on evaluation corpora."),
        "test": (test, "Same as validate (LightningCLI naming)."),
        "fit": (finetune, "Sparse fine-tuning of a pruned model (local or federated); its zeros stay zeros."),
        "plot": (plot, "Plot perplexity vs sparsity and per-layer sparsity from run directories."),
    }


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser], dict[str, Callable[..., Any]]]:
    parser = ArgumentParser(prog="fedspallm", description="Federated pruning of large language models (FedSpaLLM).",
                            exit_on_error=False)
    subcommands = parser.add_subcommands(dest="subcommand")
    subparsers: dict[str, ArgumentParser] = {}
    functions: dict[str, Callable[..., Any]] = {}
    for name, (function, help_text) in _commands().items():
        sub = ArgumentParser(description=help_text, exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="A YAML config file (as written by --print_config).")
        positional = getattr(function, "cli_positional", {})  # e.g. plot's RUN_DIR [RUN_DIR ...]
        for key, help_positional in positional.items():
            sub.add_argument(key, nargs="+", help=help_positional)
        sub.add_function_arguments(function, skip=INTERNAL | set(positional))
        subcommands.add_subcommand(name, sub, help=help_text)
        subparsers[name] = sub
        functions[name] = function
    return parser, subparsers, functions


def _dump(sub: ArgumentParser, cfg: Namespace) -> str:
    cfg = cfg.clone()
    if "config" in cfg:
        del cfg["config"]
    return sub.dump(cfg, skip_unset=False)


def one_line(err: ArgumentError) -> str:
    """jsonargparse's own message on one line.

    Its messages name the key, the value and what was expected, spread over several lines; for a
    union type they add one nested line per member type ("- Expected ..."), which only repeats the
    subtypes already listed, and the given value's Python type. Those are left out; the rest is joined.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("- ", "Errors:", "Given value type:"))]
    return " ".join(kept) or type(err).__name__


def _rank() -> int:
    """This process's global rank, before or after the process group exists (0 when alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "LOCAL_RANK"):
        if os.environ.get(name, "0").isdigit() and int(os.environ.get(name, "0")):
            return int(os.environ[name])
    return 0


def _fail(message: str, code: int, *, every_rank_same: bool = False, quiet: bool = False) -> None:
    """Print ``error: <message>`` once for the run, and exit with ``code``.

    An error that every process raises alike is printed by rank 0 only; the others wait a moment
    so that the launcher (which stops all processes when one exits) lets rank 0 print it first.
    """
    if quiet or (every_rank_same and _rank() != 0):
        time.sleep(1.0)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def tune_allocator() -> bool:
    """glibc malloc: serve tensors up to 4 MB from the heap and keep up to 256 MB of freed memory.

    By default glibc maps each large allocation afresh and hands it back to the kernel when freed, so
    every new activation, Hessian or weight copy page-faults on first touch; on a CPU that is a
    noticeable share of a prune (a one-process SparseGPT prune of the embedded model: 14.1 s -> 13.3 s
    here with tensors up to 32 MB from the heap). The cost is memory a process keeps for reuse; a run
    gives it back between stages and after every calibrated block (:mod:`fedspallm.allocator`), but
    within one block forward the heap also keeps what the batch's activations fragment: with 32 MB,
    a calibration step of the default run rose 176 MiB for 100 MiB of live activations, and the
    4-process run peaked at 2.44x the model's bytes against 2.34x with 4 MB, where the activations
    of a batch (9.4 MB hidden states, 25 MB MLP intermediates) are mapped and returned at once.
    4 MB costs some of the page faults back (16 x 512 SparseGPT prune, one process: 65.8 / 59.1 s with
    32 MB, 70.8 / 68.8 s with 4 MB, alternating runs on a shared CPU). Does nothing off glibc, and
    nothing if the user tunes malloc through its environment variables. Returns whether the settings
    took.
    """
    if platform.system() != "Linux" or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 4 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: runs the subcommand; the exit status is 0 on success (never the result)."""
    tune_allocator()
    run(argv)


def run(argv: list[str] | None = None) -> Any:
    """Parse ``argv``, run the subcommand and return its result (results dict, paths, ...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, subparsers, functions = build_parser()
        cfg = parser.parse_args(argv)
        name = cfg.subcommand
        sub_cfg = cfg[name]
        config_yaml = _dump(subparsers[name], sub_cfg)
        try:
            init = subparsers[name].instantiate(sub_cfg)  # each config section checks its values here
        except UserError as err:
            _fail(str(err), 2, every_rank_same=True)
        kwargs = {k: v for k, v in init.items() if k != "config"}
        if "config_yaml" in functions[name].__code__.co_varnames:
            kwargs["config_yaml"] = config_yaml
        return functions[name](**kwargs)
    except UserError as err:
        _fail(str(err), getattr(err, "exit_code", 2), every_rank_same=getattr(err, "same_on_every_rank", False),
              quiet=getattr(err, "quiet", False))
    except ArgumentError as err:
        _fail(one_line(err), 2, every_rank_same=True)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
