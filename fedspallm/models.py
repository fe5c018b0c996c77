"""Load a causal LM from anywhere, and find its decoder blocks and prunable projections generically.

No per-family code: the decoder blocks are the one ``nn.ModuleList`` with ``num_hidden_layers``
children of one class, and the prunable matrices of a block are

- its ``nn.Linear`` modules (and GPT-2's ``Conv1D``, whose weight is stored transposed), and
- every expert's matrix in fused mixture-of-experts parameters: transformers 5 stores the experts of
  Mixtral, Qwen2-MoE, ... as 3-D parameters ``[experts, out, in]`` (``[experts, in, out]`` where the
  experts class says ``is_transposed``). Expert e of parameter ``gate_up_proj`` of module
  ``mlp.experts`` is the 2-D matrix named ``mlp.experts.gate_up_proj[e]`` (an :class:`ExpertMatrix`).

Routers are never pruned: a module named ``gate``, ``router`` or ``shared_expert_gate`` in a block
that has experts (Mixtral's ``mlp.gate``, Qwen2-MoE's ``mlp.shared_expert_gate``). Every matrix
goes through :func:`get_weight` / :func:`set_weight` as ``[out, in]``, whatever its storage.

``pruning.targets`` / ``pruning.ignore`` narrow the selection (:func:`select_prunable`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedspallm.config import ModelConfig
from fedspallm.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


_CONV1D = _conv1d_type()


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (_CONV1D is not None and isinstance(module, _CONV1D))


class ExpertMatrix:
    """Expert ``index``'s matrix in the fused 3-D parameter ``param`` of an experts ``module``."""

    def __init__(self, module: nn.Module, param: str, index: int) -> None:
        self.module, self.param, self.index = module, param, index
        self.transposed = bool(getattr(module, "is_transposed", False))

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.param)

    @property
    def weight(self) -> torch.Tensor:
        """This expert's slice, in the parameter's own layout (a view)."""
        return self.parameter[self.index]

    def __repr__(self) -> str:
        return f"ExpertMatrix({type(self.module).__name__}.{self.param}[{self.index}])"


Matrix = nn.Module | ExpertMatrix  # what find_prunable_layers returns


def is_transposed(module: Matrix) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out], nn.Linear as [out, in]; experts say so themselves."""
    if isinstance(module, ExpertMatrix):
        return module.transposed
    return _CONV1D is not None and isinstance(module, _CONV1D)


def get_weight(module: Matrix) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view where it is stored otherwise)."""
    return module.weight.t() if is_transposed(module) else module.weight


@torch.no_grad()
def set_weight(module: Matrix, weight: torch.Tensor) -> None:
    """Write an [out, in] weight back, in the module's own layout, dtype and device."""
    if is_transposed(module):
        weight = weight.t()
    module.weight.copy_(weight.to(module.weight.dtype))


def in_features(module: Matrix) -> int:
    return get_weight(module).shape[1]


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s own 3-D parameters: fused experts, one matrix per expert."""
    return [name for name, param in module.named_parameters(recurse=False) if param.dim() == 3]


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def find_decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks, found without knowing the architecture."""
    config = getattr(model, "config", None)
    depth = None
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        depth = getattr(text_config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and any(is_prunable(m) for m in module[0].modules()):
                candidates.append((name, module))
    if depth is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == depth]
    if not candidates:
        raise UserError(
            f"unsupported architecture {type(model).__name__}: no stack of decoder blocks with "
            "linear layers was found"
        )
    # The decoder stack is the outermost match (a block may hold lists of experts inside it).
    return min(candidates, key=lambda item: item[0].count("."))[1]


def _all_prunable(block: nn.Module) -> dict[str, Matrix]:
    """Every prunable matrix of one block, routers left out, by name inside the block, in forward order."""
    modules = dict(block.named_modules())
    has_experts = any(name.rsplit(".", 1)[-1] == "experts" or fused_expert_parameters(m) for name, m in modules.items())
    found: dict[str, Matrix] = {}
    for name, module in modules.items():
        if not name:
            continue
        if is_prunable(module):
            if not (has_experts and name.rsplit(".", 1)[-1] in ROUTER_NAMES):
                found[name] = module
            continue
        for param in fused_expert_parameters(module):
            for expert in range(getattr(module, param).shape[0]):
                found[f"{name}.{param}[{expert}]"] = ExpertMatrix(module, param, expert)
    return found


def find_prunable_layers(block: nn.Module) -> dict[str, Matrix]:
    """The prunable matrices of one block in scope (see :func:`select_prunable`), by name inside the
    block, in forward order."""
    found = _all_prunable(block)
    selected = block.__dict__.get("_fedspallm_selected")
    return found if selected is None else {name: matrix for name, matrix in found.items() if name in selected}


def prunable_modules(model: nn.Module, blocks: list[int] | None = None) -> dict[str, Matrix]:
    """Prunable matrices of the given blocks (all when None), by full name, in block order."""
    stack = find_decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is stack)
    indices = range(len(stack)) if blocks is None else blocks
    return {f"{prefix}.{b}.{name}": layer for b in indices for name, layer in find_prunable_layers(stack[b]).items()}


def prunable_state_keys(model: nn.Module) -> set[str]:
    """The state-dict keys that hold prunable matrices: ``<module>.weight``, or the key of a fused
    experts parameter (all its experts' matrices)."""
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(matrix.module)]}.{matrix.param}" if isinstance(matrix, ExpertMatrix) else f"{name}.weight"
            for name, matrix in prunable_modules(model).items()}


def matches(pattern: str, name: str) -> bool:
    """Whether module-name ``pattern`` selects matrix ``name`` (a full name such as
    ``model.layers.3.mlp.experts.down_proj[5]``).

    - ``re:<regex>``: the regular expression matches the whole name (``re.fullmatch``);
    - otherwise a glob (``*``, ``?``) on the whole name, or, without wildcards, a suffix at a dot:
      ``down_proj`` and ``mlp.down_proj`` select every block's ``mlp.down_proj``.

    An expert matrix also answers to its parameter's name without the ``[e]`` index, so
    ``experts.down_proj`` selects every expert's down projection; one expert takes a regex
    (``re:.*experts\.down_proj\[5\]``).
    """
    names = [name]
    if name.endswith("]") and "[" in name:
        names.append(name[: name.rindex("[")])
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.fullmatch(n) for n in names)
    if any(c in pattern for c in "*?"):
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)
    return any(n == pattern or n.endswith("." + pattern) for n in names)


def select_prunable(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None) -> None:
    """Narrow what is pruned (and counted as prunable) to the matrices that match a ``targets`` pattern
    (all when empty) and no ``ignore`` pattern; see :func:`matches` for the syntax. The choice is kept
    on the model's blocks, so every enumeration (:func:`prunable_modules`, the sparsity report, the
    federated aggregation) sees the same set. A pattern that matches no matrix is an error."""
    targets, ignore = list(targets or []), list(ignore or [])
    stack = find_decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is stack)
    every = {b: _all_prunable(block) for b, block in enumerate(stack)}
    for key, patterns in (("targets", targets), ("ignore", ignore)):
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise UserError(f"pruning.{key}: {pattern!r} is not a valid regular expression ({err})") from None
            if not any(matches(pattern, f"{prefix}.{b}.{name}") for b, found in every.items() for name in found):
                raise UserError(f"pruning.{key}: {pattern!r} matches no prunable matrix of this model "
                                f"(names look like {prefix}.0.{next(iter(every[0]), '?')})")
    for b, block in enumerate(stack):
        chosen = {name for name in every[b]
                  if (not targets or any(matches(p, f"{prefix}.{b}.{name}") for p in targets))
                  and not any(matches(p, f"{prefix}.{b}.{name}") for p in ignore)}
        block.__dict__["_fedspallm_selected"] = None if len(chosen) == len(every[b]) else frozenset(chosen)
    if not any(find_prunable_layers(block) for block in stack):
        raise UserError("pruning.targets / pruning.ignore leave no matrix to prune")


def context_length(model: nn.Module) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str


def _hub_error(name: str, err: Exception) -> UserError:
    from fedspallm.hub import hub_reachable

    where = "" if hub_reachable() else ", which is unreachable from here and not in the local cache"
    return UserError(
        f"could not load {name!r} from the Hugging Face hub{where} ({type(err).__name__}); without hub access, "
        "download the model elsewhere and pass its local directory or .gguf file as --model.name_or_path"
    )


def _load_hf(path_or_id: str, dtype: torch.dtype, revision: str | None = None,
             trust_remote_code: bool = False, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if not Path(path_or_id).exists():
        from fedspallm.hub import hub_reachable

        hub_reachable()  # an unreachable hub: resolve from the local cache at once instead of retrying
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as err:
        if Path(path_or_id).exists():
            raise UserError(f"model {path_or_id!r} is not a loadable Hugging Face model: {err}".splitlines()[0]) from None
        raise _hub_error(path_or_id, err) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err) or "not supported" in str(err):
            raise UserError(
                f"unsupported architecture {type(config).__name__} ({getattr(config, 'model_type', '?')}): "
                "fedspallm prunes decoder-only causal LMs that AutoModelForCausalLM can load"
            ) from None
        raise UserError(f"could not load model {path_or_id!r}: {str(err).splitlines()[0]}") from None
    except OSError as err:
        if Path(path_or_id).exists():
            raise UserError(f"could not load model {path_or_id!r}: {str(err).splitlines()[0]}") from None
        raise _hub_error(path_or_id, err) from None
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    _own_cpu_tensors(model)
    model.eval()
    find_decoder_blocks(model)  # fail early, with a clear line, on an unsupported layout
    return model, tokenizer


@torch.no_grad()
def _own_cpu_tensors(model: nn.Module) -> None:
    """Give every CPU parameter and buffer memory of its own.

    ``from_pretrained`` leaves tensors whose dtype matches the file memory-mapped from it, copy on
    write: the first write into each page then faults and copies it. Pruning writes every matrix, and
    writing a 1536 x 576 matrix that way took 12 ms instead of 0.3 ms (1.5 s of a 14 s prune of the
    embedded model). Copying once at load costs the same memory the writes would have taken anyway.
    """
    mapped = _file_mappings()
    for tensor in [*model.parameters(), *model.buffers()]:  # a tied weight is one parameter: copied once
        if tensor.device.type == "cpu":
            source = tensor.data
            tensor.data = source.clone()
            _drop_mapped_pages(source, mapped)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux; none elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def _drop_mapped_pages(copied: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Once a tensor read from a memory-mapped checkpoint has its own copy, give the pages it read back
    to the OS, so that loading never holds the checkpoint twice (the mapping lives until the last
    tensor is copied). Only whole pages inside a read-only checkpoint mapping are dropped; reading
    them again would read the file again."""
    start = copied.data_ptr()
    end = start + copied.untyped_storage().nbytes() - copied.storage_offset() * copied.element_size()
    end = min(end, start + copied.numel() * copied.element_size())
    if not any(low <= start and end <= high for low, high in mapped):
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                                  4)  # MADV_DONTNEED


def strip_quantization(model: nn.Module) -> None:
    """GGUF weights arrive dequantized to plain floats; forget the quantizer so that
    ``save_pretrained`` writes them and ``from_pretrained`` does not try to re-quantize them."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf_to_hf(gguf_path: Path, target: Path, expected_sha256: str | None = None) -> Path:
    """Dequantize a GGUF file once into a Hugging Face directory (atomically), and return it."""
    from fedspallm.assets import sha256_of

    gguf_path = Path(gguf_path)
    if expected_sha256 is not None:
        digest = sha256_of(gguf_path)
        if digest != expected_sha256:
            raise UserError(f"{gguf_path} has sha256 {digest}, expected {expected_sha256}")
    try:
        model, tokenizer = _load_hf(str(gguf_path.parent), torch.float32, gguf_file=gguf_path.name)
    except UserError:
        raise
    except Exception as err:  # gguf's reader raises bare errors on truncated or corrupt files
        raise UserError(f"{gguf_path}: not a readable GGUF model ({type(err).__name__}: {err})".splitlines()[0]) from None
    strip_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # another process won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_cache_dir(gguf_path: Path) -> Path:
    from fedspallm.assets import cache_dir, sha256_of

    return cache_dir() / f"gguf-{gguf_path.stem}-{sha256_of(gguf_path)[:16]}"


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """Map ``model.name_or_path`` to (path or hub id, gguf file name or None)."""
    name = cfg.name_or_path
    if name == "default":
        from fedspallm.assets import default_model_dir

        return str(default_model_dir()), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.name_or_path={name!r}: no such GGUF file")
        target = _gguf_cache_dir(path)
        if not (target / "config.json").exists():
            convert_gguf_to_hf(path, target)
        return str(target), None
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model.name_or_path={name!r}: directory has no config.json (not a Hugging Face model)")
        return str(path), None
    if name.startswith((".", "/", "~")):
        raise UserError(f"model.name_or_path={name!r}: no such file or directory")
    return name, None


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load a causal LM and its tokenizer in the dtype asked for."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    path, gguf_file = resolve_model_path(cfg)
    model, tokenizer = _load_hf(path, DTYPES[cfg.dtype], cfg.revision, cfg.trust_remote_code, gguf_file)
    return LoadedModel(model=model, tokenizer=tokenizer, source=path)
