"""Checks before any weights are loaded: every config value, the files they name, and the model's shapes.

``preflight`` runs first in ``prune``, in every process, before Fabric starts other processes.
The config's own rules (:mod:`fedspallm.config`) have run when its dataclasses were built; preflight
adds the rules between sections and opens what the config points at, cheaply:

- model files: a GGUF file must parse (magic, header, tensor table covered by the file); a local
  Hugging Face directory needs a readable config.json and complete weight files (each safetensors
  header must be covered by its file, sharded indexes must name existing shards);
- the architecture, built on the meta device (no memory, no weights): every prunable layer's input
  size must be divisible by M of an N:M pattern, seqlens must fit the context, and the strategy's
  plan must be feasible (a round plan must cover every block unless ``federation.uncovered``
  handles it); the plan is handed to the run, not computed again;
- local corpora: readable, UTF-8, not empty;
- processes: never more processes than clients, also under ``fabric run --devices N``;
- ``output.resume``: a readable checkpoint of a run with the same settings.

Every failure is one line that names the key and the value. Such errors are identical in every
process, so the CLI prints them once (rank 0).

Nothing is left behind in a module: what the checks read and tokenized comes back in
:class:`Preflight` (its ``corpora``), and the run cuts its windows from that object.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedspallm.config import (
    DataConfig,
    EvalConfig,
    FederationConfig,
    ModelConfig,
    OutputConfig,
    PruningConfig,
    RuntimeConfig,
    check_prune,
)
from fedspallm.data import Corpora
from fedspallm.dtypes import check_run_dtypes
from fedspallm.errors import UserError
from fedspallm.placement import check_offload

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Preflight:
    """What the checks loaded, for the run to use rather than load again."""

    resume: dict[str, Any] | None = None  # the loaded round checkpoint, when resuming
    plan: Any = None  # the strategy's plan (Strategy.configure), when the model's shape was known offline
    corpora: Corpora = field(default_factory=Corpora)  # the corpora read (and, with a local tokenizer, tokenized)


def same_on_every_rank(err: UserError) -> UserError:
    """Mark an error that every process raises identically: the CLI prints it once."""
    err.same_on_every_rank = True  # type: ignore[attr-defined]
    return err


def preflight(seed: int, model: ModelConfig, data: DataConfig, eval: EvalConfig, pruning: PruningConfig,
              federation: FederationConfig, output: OutputConfig, runtime: RuntimeConfig) -> Preflight:
    try:
        validate_config(model, data, eval, pruning, federation, output, runtime)
        check_offload(pruning.offload, runtime.accelerator)
        check_run_dtypes(pruning.calibration_dtype, eval.dtype, runtime.accelerator)
        local_dir, gguf = check_model_files(model)
        skeleton = model_skeleton(model, local_dir, gguf)
        plan = None
        if skeleton is not None:
            plan = check_shapes(skeleton, seed, data, eval, pruning, federation)
        corpora = Corpora()
        check_corpora(data, eval, corpora)
        resume = check_resume(seed, model, data, pruning, federation, output)
        check_corpus_lengths(local_dir, seed, data, eval, federation, corpora)  # tokenizes: the slowest check last
    except UserError as err:
        raise same_on_every_rank(err) from None
    return Preflight(resume=resume, plan=plan, corpora=corpora)


# ---------------------------------------------------------------------------------------------
# Config values


def launched_processes(runtime: RuntimeConfig) -> tuple[int | None, str]:
    """How many processes this run will have, and the flag that sets it (None if not a plain number).
    Under ``fabric run`` the launcher's flags win over ``runtime``."""
    from lightning.fabric.connector import _is_using_cli

    if _is_using_cli():
        devices, nodes = os.environ.get("LT_DEVICES", "1"), os.environ.get("LT_NUM_NODES", "1")
        if not (devices.isdigit() and nodes.isdigit()):
            return None, ""
        return int(devices) * int(nodes), f"fabric run --devices {devices} --num-nodes {nodes}"
    return runtime.devices * runtime.num_nodes, f"runtime.devices={runtime.devices} x num_nodes={runtime.num_nodes}"


def validate_config(model: ModelConfig, data: DataConfig, eval: EvalConfig, pruning: PruningConfig,
                    federation: FederationConfig, output: OutputConfig, runtime: RuntimeConfig) -> None:
    """The rules between sections, and the processes this run has (no files opened; every section has
    checked its own keys when it was built)."""
    check_prune(data, pruning, federation)
    from fedspallm.federated.rounds import check_processes
    from fedspallm.federated.strategies import STRATEGIES, get_strategy

    strategy = get_strategy(federation.strategy)
    processes, flag = launched_processes(runtime)
    if processes is not None and strategy.clients_per_process:
        check_processes(processes, federation.num_clients, how=flag)
    if processes is not None and federation.secure_aggregation:
        from fedspallm.federated.secure_aggregation import check_setup, encodings

        check_setup(processes, encodings(federation.secure_bounds), how=flag)
    if not strategy.round_based:
        round_based = ", ".join(name for name, cls in STRATEGIES.items() if cls.round_based)
        for key, value in (("federation.fail_client", federation.fail_client), ("output.resume", output.resume)):
            if value is not None:
                raise UserError(f"{key}={value!r}: only for round-based strategies ({round_based}), "
                                f"not federation.strategy={federation.strategy}")


# ---------------------------------------------------------------------------------------------
# Model files


def check_model_files(cfg: ModelConfig) -> tuple[Path | None, Path | None]:
    """(local HF directory, GGUF file still to convert); (None, None) for a hub id."""
    name = cfg.name_or_path
    if name == "default":
        from fedspallm.assets import DEFAULT_MODEL_DIRNAME, cache_dir

        converted = cache_dir() / DEFAULT_MODEL_DIRNAME
        return (converted, None) if (converted / "config.json").is_file() else (None, None)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name_or_path={name!r}: no such GGUF file")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise UserError(f"model.name_or_path={name!r}: not a GGUF file (it does not start with the GGUF magic bytes)")
        from fedspallm.models import _gguf_cache_dir

        converted = _gguf_cache_dir(path)
        return (converted, None) if (converted / "config.json").is_file() else (None, path)
    if not path.exists():
        return None, None  # a hub id (ModelConfig rejected missing local-looking paths)
    if not path.is_dir():
        raise UserError(f"model.name_or_path={name!r}: a model is a Hugging Face directory or a .gguf file")
    if not (path / "config.json").is_file():
        raise UserError(f"model.name_or_path={name!r}: directory has no config.json (not a Hugging Face model)")
    check_weight_files(name, path)
    return path, None


def check_weight_files(key_value: str, directory: Path) -> None:
    """Every weight file of a local model directory is present and as long as its own header says."""
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("pytorch_model*.bin"))
    for index in _WEIGHT_INDEXES:
        if (directory / index).is_file():
            try:
                shards = set(json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"model.name_or_path={key_value!r}: {index} is not a valid weight index") from None
            missing = sorted(s for s in shards if not (directory / s).is_file())
            if missing:
                raise UserError(f"model.name_or_path={key_value!r}: weight shard {missing[0]} named in {index} is missing")
    if not files:
        raise UserError(f"model.name_or_path={key_value!r}: no weights in the directory (*.safetensors or "
                        "pytorch_model*.bin)")
    for file in files:
        problem = _safetensors_problem(file) if file.suffix == ".safetensors" else _torch_zip_problem(file)
        if problem:
            raise UserError(f"model.name_or_path={key_value!r}: {file.name} is {problem}")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, not even a header)"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"truncated ({size} bytes, its header alone needs {8 + length})"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "corrupt (its safetensors header is not valid JSON)"
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return "corrupt (its safetensors header has no valid tensor offsets)"
    if 8 + length + end > size:
        return f"truncated ({size} bytes, its header describes {8 + length + end})"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        if handle.read(2) != b"PK":
            return None  # a legacy (non-zip) torch file: left to torch.load
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"truncated or corrupt ({err})"
    return None


# ---------------------------------------------------------------------------------------------
# Shapes, from a weightless model


def model_skeleton(cfg: ModelConfig, local_dir: Path | None, gguf: Path | None) -> nn.Module | None:
    """The model built on the meta device from its config (no weights), or None when it can't be had offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if local_dir is None and gguf is None:
        return None  # a hub id, or the embedded model before its first conversion
    try:
        if gguf is not None:
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            config = AutoConfig.from_pretrained(str(local_dir), trust_remote_code=cfg.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers and gguf raise many types on bad files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        what = "a readable GGUF file (truncated or corrupt" if gguf is not None else "a readable model config ("
        raise UserError(f"model.name_or_path={cfg.name_or_path!r}: not {what}: {reason})") from None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - an unsupported architecture: loading reports it properly
        return None


def check_context(net: nn.Module, seqlens: dict[str, int]) -> None:
    """Every window (``{key: seqlen}``) fits the model's context; an error every process raises alike."""
    from fedspallm.models import context_length

    limit = context_length(net)
    for key, seqlen in seqlens.items():
        if limit is not None and seqlen > limit:
            raise same_on_every_rank(UserError(f"{key}={seqlen}: above the model's context of {limit} tokens"))


def check_lengths(net: nn.Module, data: DataConfig, eval: EvalConfig) -> None:
    check_context(net, {"data.seqlen": data.seqlen, "eval.seqlen": eval.seqlen})


def check_shapes(net: nn.Module, seed: int, data: DataConfig, eval: EvalConfig, pruning: PruningConfig,
                 federation: FederationConfig) -> Any:
    """Shapes against the config; returns the strategy's plan for this model (checked, e.g. its coverage)."""
    from fedspallm.federated.strategies import get_strategy
    from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules, select_prunable

    check_lengths(net, data, eval)
    select_prunable(net, pruning.targets, pruning.ignore)
    n, m = pruning.n_m
    layers = prunable_modules(net)
    sizes = sorted({get_weight(layer).shape[1] for layer in layers.values()})
    for name, layer in layers.items():
        size = get_weight(layer).shape[1]
        if m and size % m:
            raise UserError(
                f"pruning.pattern={pruning.pattern!r}: M={m} does not divide the input size {size} of {name}; "
                f"M must divide every prunable layer's input size ({', '.join(map(str, sizes))})"
            )
    return get_strategy(federation.strategy).configure(federation, len(find_decoder_blocks(net)), seed)


# ---------------------------------------------------------------------------------------------
# Corpora and checkpoints


def check_corpora(data: DataConfig, eval: EvalConfig, corpora: Corpora) -> None:
    """Local files must be readable UTF-8 with some text (hub sets are checked when they are loaded).
    Their documents stay in ``corpora``."""
    for key, split, name in _local_corpora(data, eval):
        try:
            corpora.documents(name, split)
        except UserError as err:
            raise _keyed(key, name, err) from None


def check_corpus_lengths(local_dir: Path | None, seed: int, data: DataConfig, eval: EvalConfig,
                         federation: FederationConfig, corpora: Corpora) -> None:
    """With the model's tokenizer at hand (a local directory), every window must fit its corpus.

    The tokenized corpora stay in ``corpora``, which the run tokenizes through: nothing is tokenized twice.
    """
    named = _local_corpora(data, eval) + _local_corpora(data, eval, "default")
    if local_dir is None or not named:
        return
    from transformers import AutoTokenizer

    from fedspallm.data import eval_windows, plan_calibration

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
    except Exception:  # noqa: BLE001 - loading the model reports a broken tokenizer properly
        return
    for key, split, name in named:
        try:
            if split == "train":
                plan_calibration(name, tokenizer, data.nsamples, data.seqlen, federation.num_clients, data.partition,
                                 data.alpha, seed, corpora)
            else:
                eval_windows(name, tokenizer, eval.seqlen, eval.max_windows, corpora)
        except UserError as err:
            raise _keyed(key, name, err) from None


def _local_corpora(data: DataConfig, eval: EvalConfig, only: str | None = None) -> list[tuple[str, str, str]]:
    """(key, split, name) of the corpora that are files (or, with only="default", the embedded one)."""
    named = [("data.calibration", "train", data.calibration)] + [("eval.datasets", "test", n) for n in eval.datasets]
    if only is not None:
        return [item for item in named if item[2] == only]
    return [item for item in named if item[2] not in ("default", "wikitext2", "ptb", "c4")]


def _keyed(key: str, name: str, err: UserError) -> UserError:
    """Prefix a corpus error with the key that named the corpus (once)."""
    message = str(err)
    if message.startswith(f"{key}="):
        return UserError(message)
    for prefix in (f"{name}: ", f"{Path(name).expanduser()}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    return UserError(f"{key}={name!r}: {message}")


def check_resume(seed: int, model: ModelConfig, data: DataConfig, pruning: PruningConfig,
                 federation: FederationConfig, output: OutputConfig) -> dict[str, Any] | None:
    if output.resume is None:
        return None
    from fedspallm.checkpoint import fingerprint, load_checkpoint

    return load_checkpoint(output.resume, fingerprint(seed, model, data, pruning, federation), federation.rounds)
