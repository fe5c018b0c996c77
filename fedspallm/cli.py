"""The ``fedspallm`` command: LightningCLI-style subcommands driven by typed signatures (jsonargparse).

    fedspallm prune    --config configs/default.yaml --pruning.sparsity 0.8
    fedspallm validate --model.name_or_path lightning_logs/version_0/model
    fedspallm prune    --print_config > my.yaml

Errors in the user's input print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from fedspallm.errors import UserError

INTERNAL = {"config_yaml"}


def _commands() -> dict[str, tuple[Callable[..., Any], str]]:
    from fedspallm.evaluate import test, validate
    from fedspallm.plot import plot
    from fedspallm.prune import prune

    return {
        "prune": (prune, "Prune a model: federated (fedspallm, fedavg, mask_vote), centralized or standalone."),
        "validate": (validate, "Perplexity of a model (dense or pruned) on evaluation corpora."),
        "test": (test, "Same as validate (LightningCLI naming)."),
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
    return sub.dump(cfg, skip_none=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # jsonargparse nests the reason under a generic header; the most specific line is the useful one.
    specific = [line for line in lines if not line.startswith(("Parser key", "Problem with given class", "- "))]
    return (specific or lines)[0] if len(lines) < 3 else "; ".join(lines[:3])


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, subparsers, functions = build_parser()
        cfg = parser.parse_args(argv)
        name = cfg.subcommand
        sub_cfg = cfg[name]
        config_yaml = _dump(subparsers[name], sub_cfg)
        init = subparsers[name].instantiate_classes(sub_cfg)
        kwargs = {k: v for k, v in init.items() if k != "config"}
        if "config_yaml" in functions[name].__code__.co_varnames:
            kwargs["config_yaml"] = config_yaml
        return functions[name](**kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
