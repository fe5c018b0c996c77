"""The sequential, block-by-block calibration engine.

One mechanism for every architecture: a forward pre-hook (``with_kwargs=True``) on the first
decoder block catches its hidden states and *every* keyword argument it receives (attention
masks, ``position_embeddings``, ``cache_position``, ...) and stops the forward pass. Each block then
runs on those inputs: hooks gather the statistics of its projections, the selected projections are
pruned, and the block runs again so that its pruned outputs feed the next block (as in SparseGPT).
Only one block's activations are held at a time.

Projections that read the same tensor (q/k/v, gate/up) are grouped on the fly by the identity of
their input and share one statistic.
"""

from __future__ import annotations

import inspect

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedspallm.errors import UserError
from fedspallm.models import find_decoder_blocks, find_prunable_layers, get_weight, set_weight
from fedspallm.pruners import (
    PruneResult,
    accumulate_hessian,
    accumulate_sq_norms,
    all_finite,
    magnitude_prune,
    sparsegpt_prune_group,
    validate_pattern,
    wanda_prune,
)

METHODS = ("sparsegpt", "wanda", "magnitude")


class NumericalError(UserError):
    """NaN/inf in weights or statistics, or a Hessian that stays singular under maximal damping."""


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how; pure data so that clients and the server agree on it."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"pruning.method={self.method!r}: use one of {', '.join(METHODS)}")


@dataclass
class _Statistic:
    value: torch.Tensor | None = None
    nsamples: int = 0


@dataclass
class SequentialStats:
    """Counters the benchmark turns into throughput figures."""

    tokens: int = 0
    forward_passes: int = 0
    statistic_updates: int = 0
    blocks_pruned: int = 0
    layers_pruned: int = 0


@dataclass
class SequentialResult:
    pruned: dict[str, PruneResult] = field(default_factory=dict)  # full module name -> result
    stats: SequentialStats = field(default_factory=SequentialStats)


_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


class _StopForward(Exception):
    pass


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _move_all_but_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """With offload, everything except the decoder blocks (embeddings, rotary tables, final norm) lives on the device."""
    inside = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in inside:
            tensor.data = tensor.data.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the model up to its first decoder block and return (hidden_states, kwargs) per batch."""
    blocks = find_decoder_blocks(model)
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # Bind to the block's own signature so that positional extras (GPT-2 passes several) become
        # keywords too; the first parameter is the hidden states, whatever its name.
        signature = inspect.signature(module.forward)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        hidden = arguments.pop(next(iter(signature.parameters)))
        extra = {k: v for k, v in arguments.items() if k not in _CACHE_KWARGS}
        captured.append((hidden, extra))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _prune_group(names: list[str], spec: PruneSpec, weights: list[torch.Tensor], statistic: _Statistic,
                 keeps: list[torch.Tensor | None]) -> list[PruneResult]:
    """Prune weights that share one statistic; SparseGPT inverts their Hessian once for all of them."""
    if spec.method != "sparsegpt":
        return [_prune_one(name, spec, weight, statistic, keep) for name, weight, keep in zip(names, weights, keeps)]
    try:
        return sparsegpt_prune_group(weights, statistic.value, spec.sparsity, spec.n, spec.m, spec.blocksize,
                                     spec.percdamp, keeps=keeps)
    except FloatingPointError as err:
        # The statistic is the input of the first layer that reads it; a NaN there reaches all of them.
        where = names[0] if str(err).startswith("hessian") else "/".join(names)
        raise NumericalError(f"{where}: {err}") from None


def _prune_one(name: str, spec: PruneSpec, weight: torch.Tensor, statistic: _Statistic,
               keep: torch.Tensor | None) -> PruneResult:
    """Wanda or magnitude, which have no weight update: a given mask is all there is."""
    if keep is not None:
        return PruneResult.from_mask(weight, keep.to(weight.device))
    try:
        if spec.method == "wanda":
            return wanda_prune(weight, statistic.value, spec.sparsity, spec.n, spec.m)
        return magnitude_prune(weight, spec.sparsity, spec.n, spec.m)
    except FloatingPointError as err:
        raise NumericalError(f"{name}: {err}") from None


def check_prunable(model: nn.Module, blocks_to_prune: Iterable[int], spec: PruneSpec) -> None:
    """Reject impossible requests before any work: bad block indices, N:M that doesn't fit a layer."""
    blocks = find_decoder_blocks(model)
    for index in blocks_to_prune:
        if not 0 <= index < len(blocks):
            raise UserError(f"block index {index} is out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})")
        for name, layer in find_prunable_layers(blocks[index]).items():
            try:
                validate_pattern(get_weight(layer).shape[1], spec.sparsity, spec.n, spec.m)
            except ValueError as err:
                raise UserError(f"block {index} {name}: {err}") from None


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    spec: PruneSpec,
    blocks_to_prune: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    offload: bool = False,
    restore_dense: bool = False,
    prune_from: Mapping[str, torch.Tensor] | None = None,
    fixed_masks: Mapping[str, torch.Tensor] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    on_block_output: Callable[[int, list[torch.Tensor]], None] | None = None,
) -> SequentialResult:
    """Prune ``blocks_to_prune`` (all blocks when None) of ``model`` on ``windows`` ([n, seqlen] token ids).

    ``restore_dense`` puts each block's original weights back once its pruned outputs are computed:
    later blocks still see pruned inputs (as the pruning client would), but the model leaves this
    function as it came in. Federated clients use it to keep their dense cache across rounds.

    ``prune_from`` maps full module names to the weights a selected block is loaded with before its
    statistics are gathered and it is pruned; its pruned outputs still feed the next block. Federated
    clients that calibrate on the global model pass their dense cache: re-pruning an already pruned
    matrix to the same target would only find its own zeros again (zeros score lowest in every
    pruner). ``fixed_masks`` (full module name -> keep-mask) gives the mask instead of letting the
    pruner choose it; SparseGPT then only refits the kept weights.
    """
    blocks = find_decoder_blocks(model)
    selected = sorted(set(range(len(blocks)) if blocks_to_prune is None else blocks_to_prune))
    check_prunable(model, selected, spec)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise UserError("pruning needs at least one calibration window")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix = next(name for name, module in model.named_modules() if module is blocks)
    result = SequentialResult()
    result.stats.tokens = int(windows.numel())

    if offload:
        blocks.to("cpu")
        _move_all_but_blocks(model, blocks, device)
    needs_data = spec.method != "magnitude"
    # Magnitude pruning reads no inputs: unless the caller wants the outputs, nothing runs forward at all.
    propagate = needs_data or on_block_output is not None
    batches = capture_block_inputs(model, windows, batch_size, device) if propagate else []
    hidden = [h for h, _ in batches]
    kwargs = [k for _, k in batches]
    last_selected = selected[-1] if selected else -1

    for index, block in enumerate(blocks):
        if index > last_selected and on_block_output is None:
            break  # nothing left to prune: later blocks' outputs are not needed
        if offload:
            block.to(device)
        layers = find_prunable_layers(block) if index in selected else {}
        original = {name: layer.weight.detach().clone() for name, layer in layers.items()} if restore_dense else {}
        if prune_from is not None:
            for name, layer in layers.items():
                set_weight(layer, prune_from[f"{prefix}.{index}.{name}"])
        statistics: dict[str, _Statistic] = {}
        if layers and needs_data:
            _collect_statistics(block, layers, hidden, kwargs, spec.method, statistics, result.stats)
        # Layers that share a statistic are pruned together (q/k/v, gate/up); the others one by one.
        groups: dict[int | str, list[str]] = {}
        for name in layers:
            groups.setdefault(id(statistics[name]) if name in statistics else name, []).append(name)
        pruned: dict[str, PruneResult] = {}
        for names in groups.values():
            full_names = [f"{prefix}.{index}.{name}" for name in names]
            weights = [get_weight(layers[name]).detach() for name in names]
            for full_name, weight in zip(full_names, weights):
                if not all_finite(weight):
                    raise NumericalError(f"{full_name}: weight contains NaN or inf")
            keeps = [fixed_masks.get(full_name) if fixed_masks is not None else None for full_name in full_names]
            statistic = statistics.get(names[0], _Statistic())
            pruned.update(zip(names, _prune_group(full_names, spec, weights, statistic, keeps)))
        for name, layer in layers.items():
            set_weight(layer, pruned[name].weight)
            result.pruned[f"{prefix}.{index}.{name}"] = pruned[name]
            result.stats.layers_pruned += 1
        if layers:
            result.stats.blocks_pruned += 1
        if propagate:
            hidden = [_first_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]
            result.stats.forward_passes += len(hidden)
        for name, layer in layers.items():
            if restore_dense:
                layer.weight.copy_(original[name])
        if on_block_output is not None:
            on_block_output(index, hidden)
        if offload:
            block.to("cpu")
        if on_block is not None:
            on_block(index, len(blocks))
    return result


def _collect_statistics(
    block: nn.Module,
    layers: dict[str, nn.Module],
    hidden: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    method: str,
    statistics: dict[str, _Statistic],
    counters: SequentialStats,
) -> None:
    """One forward pass over the block with hooks; layers that read the same tensor share a statistic."""
    accumulate = accumulate_hessian if method == "sparsegpt" else accumulate_sq_norms
    # Identity of an input tensor in the current pass -> (owning layer, the tensor). Holding the tensor
    # keeps its memory from being reused by a later, different input with the same address.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            inputs = args[0]
            key = (inputs.data_ptr(), tuple(inputs.shape), tuple(inputs.stride()))
            owner = seen.setdefault(key, (name, inputs))[0]
            if owner != name:
                statistics[name] = statistics[owner]  # same tensor object: share, don't recompute
                return
            stat = statistics.setdefault(name, _Statistic())
            stat.value, stat.nsamples = accumulate(stat.value, stat.nsamples, inputs.detach())
            counters.statistic_updates += 1

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            seen.clear()
            block(h, **kw)
            counters.forward_passes += 1
    finally:
        for handle in handles:
            handle.remove()
