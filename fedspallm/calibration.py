"""The sequential, block-by-block calibration engine.

One mechanism for every architecture. Each block gets the inputs the model's own forward gives it:
one pass of the model's forward, in which every block records its arguments instead of computing
(:func:`capture_block_inputs`), yields block 0's hidden states and *every* keyword argument of
every block (its own attention mask, sliding or full; ``position_embeddings``; ``position_ids``, ...).
Then, block by block (:class:`SequentialCalibration`): hooks gather the statistics of its
projections (``collect``), the selected projections are pruned from statistics (``prune``; a
federated caller may sum them over clients first), and the block runs again so that its pruned
outputs feed the next (``advance``), as in SparseGPT. Only one block's activations are held at a time.

Projections that read the same tensor (q/k/v, gate/up) are grouped on the fly by the identity of
their input and share one statistic. Fused mixture-of-experts parameters (transformers 5) are one
matrix per expert (:class:`fedspallm.models.ExpertMatrix`); during ``collect`` their module runs its
eager per-expert forward and each expert matrix gets the statistics of the tokens routed to it (and,
for the down projection, of their activations), caught where the forward applies that expert's slice.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fedspallm.allocator import release_freed_memory
from fedspallm.dtypes import cast_floats, check_compute_dtype, parameters_in
from fedspallm.errors import UserError
from fedspallm.models import (
    ExpertMatrix,
    Matrix,
    find_decoder_blocks,
    find_prunable_layers,
    get_weight,
    in_features,
    set_weight,
)
from fedspallm.placement import release
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

log = logging.getLogger(__name__)

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
    calibration_dtype: str | None = None  # the block forwards' dtype by name; None: the model's own

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"pruning.method={self.method!r}: use one of {', '.join(METHODS)}")
        if self.calibration_dtype not in (None, "float32", "bfloat16", "float16"):
            raise UserError(f"pruning.calibration_dtype={self.calibration_dtype!r}: use float32 or bfloat16")


STATISTIC_KINDS = {"sparsegpt": "hessian", "wanda": "sq_norms"}
UNCOVERED = ("error", "magnitude", "dense")


@dataclass
class Statistic:
    """The statistic of one distinct input of a block: what SparseGPT or Wanda prunes from.

    ``value`` is kept as the pruners read it, a running mean over ``samples`` sequences in float32
    (as SparseGPT's reference does, see NOTES.md): ``hessian`` H = (2/n) sum x x^T [in, in],
    ``sq_norms`` s = (1/n) sum_tokens x_j^2 [in]. ``tokens`` counts the tokens behind it.

    Across clients the statistic travels as a plain sum (:meth:`to_sum`: sum x x^T, or sum x_j^2,
    in float64) with its counts, and comes back with :meth:`from_sum`. The sum of the clients'
    sums is the sum over the union of their windows, so pruning from it is pruning on the union.
    Scale does not matter to the pruners: SparseGPT damps relative to mean(diag H) and its mask and
    update are invariant to scaling H, Wanda ranks each row by |W| * norm. ``from_sum(to_sum())``
    gives back ``value`` bit for bit while samples < 2^29 (an fp32 times such an integer is exact in
    fp64, and so is the division back), so one client's statistic through a sum prunes exactly
    as the local one.
    """

    kind: str  # "hessian" | "sq_norms"
    value: torch.Tensor | None = None
    samples: int = 0
    tokens: int = 0

    def to_sum(self) -> torch.Tensor:
        """The plain sum over this statistic's tokens, float64: sum x x^T [in, in] or sum x_j^2 [in]."""
        if self.value is None:
            raise ValueError("an empty statistic has no sum; its shape is unknown")
        total = self.value.double() * self.samples
        return total / 2 if self.kind == "hessian" else total

    @classmethod
    def from_sum(cls, kind: str, total: torch.Tensor, samples: int, tokens: int) -> Statistic:
        """The statistic whose :meth:`to_sum` is ``total`` (a sum over ``samples`` sequences)."""
        if kind not in STATISTIC_KINDS.values():
            raise ValueError(f"unknown statistic kind {kind!r}")
        if samples <= 0:
            return cls(kind, torch.zeros_like(total, dtype=torch.float32), 0, tokens)
        scale = 2.0 if kind == "hessian" else 1.0
        return cls(kind, (total.double() * scale / samples).float(), samples, tokens)


@dataclass
class BlockStatistics:
    """The statistics of one block's projections, one per distinct input.

    ``readers`` maps each prunable matrix of the block (its name inside the block) to the key of the
    statistic it reads; the key is the name of the first matrix that reads that input in forward
    order (q/k/v share ``self_attn.q_proj``'s, gate/up ``mlp.gate_proj``'s). ``values`` maps keys to
    statistics. Every process derives the same readers from the block's structure
    (:meth:`SequentialCalibration.readers`), so sums can be exchanged key by key.
    """

    kind: str
    readers: dict[str, str] = field(default_factory=dict)
    values: dict[str, Statistic] = field(default_factory=dict)

    def sums(self) -> dict[str, torch.Tensor]:
        """Key -> plain float64 sum (see :meth:`Statistic.to_sum`)."""
        return {key: stat.to_sum() for key, stat in self.values.items()}

    def counts(self) -> dict[str, tuple[int, int]]:
        """Key -> (samples, tokens)."""
        return {key: (stat.samples, stat.tokens) for key, stat in self.values.items()}

    @classmethod
    def from_sums(cls, kind: str, readers: Mapping[str, str], sums: Mapping[str, torch.Tensor],
                  counts: Mapping[str, tuple[int, int]]) -> BlockStatistics:
        """Statistics from (summed) plain sums and counts, e.g. after a reduce over clients."""
        values = {key: Statistic.from_sum(kind, sums[key], *counts[key]) for key in sums}
        return cls(kind, dict(readers), values)

    def of(self, name: str) -> Statistic:
        """The statistic that matrix ``name`` reads."""
        return self.values[self.readers[name]]


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
    uncovered: dict[str, str] = field(default_factory=dict)  # full name -> "magnitude" | "dense" (see prune)


_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


class _StopForward(Exception):
    pass


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _move_all_but_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """With offload, during a walk, everything except the decoder blocks (embeddings, rotary tables, final norm)
    lives on the device; :meth:`SequentialCalibration.finish` puts it back."""
    inside = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in inside:
            tensor.data = tensor.data.to(device)


@dataclass
class BlockInputs:
    """What the model's own forward hands its decoder blocks, per batch of windows.

    ``hidden[b]`` is batch b's input to block 0. ``kwargs[i][b]`` holds every other argument the
    model passes block i for batch b (as keywords, caches dropped): its own attention mask (sliding
    window or full), ``position_embeddings``, ``position_ids``, ... These are the model's own
    objects, not copies: a mask or a (cos, sin) pair that several blocks share is held once.
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]


def batch_bounds(count: int, batch_size: int, groups: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(start, stop) of each batch of ``count`` windows: ``batch_size`` at a time, never across a group.

    ``groups`` are the sizes of consecutive runs of windows (the clients' shares of a union, in
    client order). A batch that never straddles two clients is computed as that client computes it
    alone, which is what makes ``centralized`` and ``fedstats`` the same sum (see
    :mod:`fedspallm.federated.summed_statistics`).
    """
    groups = [count] if groups is None else list(groups)
    if sum(groups) != count or any(size < 0 for size in groups):
        raise ValueError(f"groups {groups} do not split {count} windows")
    bounds, start = [], 0
    for size in groups:
        bounds += [(first, min(first + batch_size, start + size)) for first in range(start, start + size, batch_size)]
        start += size
    return bounds


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                         through: int | None = None, groups: Sequence[int] | None = None) -> BlockInputs:
    """Every block's keyword arguments (blocks 0..``through``, all when None), and block 0's hidden states.

    One pass of the model's own forward per batch in which each block only records what it is given
    and hands its input on unchanged: the embeddings, masks and rotary tables are computed as the
    model computes them, for every layer type (Gemma 2/3 alternate sliding and full attention, Qwen2
    slides above ``max_window_layers``), and no block is computed. The pass stops after block
    ``through``. This assumes, as every transformers decoder stack does, that what the model passes a
    block besides the hidden states does not depend on the earlier blocks' outputs. Batches follow
    :func:`batch_bounds`.
    """
    blocks = find_decoder_blocks(model)
    through = len(blocks) - 1 if through is None else through
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(through + 1)]

    def recorder(index: int, block: nn.Module) -> Callable:
        # Bind to the block's own signature so that positional extras (GPT-2 passes several) become
        # keywords too; the first parameter is the hidden states, whatever its name.
        signature = inspect.signature(block.forward)

        def record(*args: Any, **given: Any) -> Any:
            arguments = dict(signature.bind_partial(*args, **given).arguments)
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name, {}))
            states = arguments.pop(next(iter(signature.parameters)))
            if index == 0:
                hidden.append(states)
            kwargs[index].append({k: v for k, v in arguments.items() if k not in _CACHE_KWARGS})
            if index == through:
                raise _StopForward
            return states

        return record

    # An instance attribute shadows the class's forward; whatever was there before (an accelerate
    # hook, say) is put back afterwards.
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks[: through + 1]):
            block.forward = recorder(index, block)
        for start, stop in batch_bounds(windows.shape[0], batch_size, groups):
            batch = windows[start:stop].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
    return BlockInputs(hidden, kwargs)


def _prune_group(names: list[str], spec: PruneSpec, weights: list[torch.Tensor], statistic: Statistic | None,
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


def _prune_one(name: str, spec: PruneSpec, weight: torch.Tensor, statistic: Statistic | None,
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


class SequentialCalibration:
    """One client's windows, walked through the model block by block: the engine, step by step.

    Per block ``index``, in this order:

    - :meth:`collect` runs the inputs through the block with hooks and returns the statistics of its
      projections (nothing is pruned);
    - :meth:`prune` prunes the block's projections from given statistics (this client's, or a sum
      over clients) with the deterministic kernels, in place in the model;
    - :meth:`advance` runs the inputs through the block as it now is; its outputs become the
      inputs of block ``index + 1``.

    :func:`prune_sequential` is these three steps in a loop. A federated caller can reduce the
    statistics between :meth:`collect` and :meth:`prune`. :meth:`prune` depends only on the model and
    the statistics, so several clients that share one model call it once and :meth:`advance` each.

    The inputs are captured lazily, at the first :meth:`collect` or :meth:`advance`: every block
    gets the keyword arguments the model's own forward gives it (:func:`capture_block_inputs`), up
    to block ``through``. Only one block's inputs are held per batch (plus the small per-block
    keyword dicts, which share the model's mask and rotary tensors). ``groups`` keeps batches within
    consecutive runs of windows (:func:`batch_bounds`).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, spec: PruneSpec, *, batch_size: int = 8,
                 device: torch.device | str | None = None, offload: bool = False, through: int | None = None,
                 stats: SequentialStats | None = None, groups: Sequence[int] | None = None) -> None:
        self.model = model
        self.blocks = find_decoder_blocks(model)
        self.prefix = next(name for name, module in model.named_modules() if module is self.blocks)
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise UserError("pruning needs at least one calibration window")
        self.windows = windows
        self.spec = spec
        self.batch_size = batch_size
        self.groups = groups
        batch_bounds(windows.shape[0], batch_size, groups)  # a bad split fails here, not at the first forward
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload = offload
        self.through = len(self.blocks) - 1 if through is None else through
        self.stats = stats if stats is not None else SequentialStats()
        # Block forwards in spec.calibration_dtype: the block's parameters are cast for each pass and
        # put back (fedspallm.dtypes.parameters_in), the inputs are kept in that dtype; the hooks
        # accumulate float32 statistics from its activations, the solves and the weights stay as they are.
        dtype = getattr(torch, spec.calibration_dtype) if spec.calibration_dtype else None
        self.compute_dtype = None if dtype == next(model.parameters()).dtype else dtype
        if self.compute_dtype is not None:
            check_compute_dtype(self.compute_dtype, self.device, "pruning.calibration_dtype")
        self.stats.tokens += int(windows.numel())
        self.position = 0  # the block whose inputs ``hidden`` holds
        self.uncovered: dict[str, str] = {}  # matrices no calibration token reached -> what was done
        self._inputs: BlockInputs | None = None
        self.hidden: list[torch.Tensor] = []
        if offload:
            self.blocks.to("cpu")
            _move_all_but_blocks(model, self.blocks, self.device)

    # -- naming

    def full_name(self, index: int, name: str) -> str:
        return f"{self.prefix}.{index}.{name}"

    def layers(self, index: int) -> dict[str, Matrix]:
        """The prunable projections of block ``index``, by name inside the block."""
        return find_prunable_layers(self.blocks[index])

    def inputs(self, index: int) -> list[torch.Tensor]:
        """The inputs of block ``index`` per batch (the block the walk is at)."""
        self._ready(index)
        return self.hidden

    # -- the three steps

    def _ready(self, index: int) -> nn.Module:
        if self._inputs is None:
            self._inputs = capture_block_inputs(self.model, self.windows, self.batch_size, self.device, self.through,
                                                self.groups)
            if self.compute_dtype is not None:
                memo: dict[int, torch.Tensor] = {}  # a tensor several blocks share is cast once
                self._inputs = BlockInputs(cast_floats(self._inputs.hidden, self.compute_dtype, memo),
                                           cast_floats(self._inputs.kwargs, self.compute_dtype, memo))
            self.hidden = self._inputs.hidden
        if index != self.position:
            raise ValueError(f"the inputs are those of block {self.position}, not of block {index}")
        if index > self.through:
            raise ValueError(f"inputs were captured through block {self.through}, not {index}")
        block = self.blocks[index]
        if self.offload:
            block.to(self.device)
        return block

    @torch.no_grad()
    def collect(self, index: int, on_batch: Callable[[BlockStatistics], None] | None = None) -> BlockStatistics:
        """This client's statistics of block ``index``'s projections (one forward pass, nothing pruned).

        With ``on_batch``, each batch's statistics are handed to it on their own (a running mean over
        that batch alone) and the result holds only the readers: a caller that sums batches in fixed
        point (:class:`~fedspallm.federated.summed_statistics.BlockWords`) gets a sum that does not depend
        on how batches are grouped into clients."""
        block = self._ready(index)
        kind = STATISTIC_KINDS.get(self.spec.method)
        if kind is None:
            raise ValueError(f"{self.spec.method} pruning reads no statistics")
        statistics = BlockStatistics(kind)
        with parameters_in(block, self.compute_dtype):
            _collect_statistics(block, self.layers(index), self.hidden, self._inputs.kwargs[index], kind, statistics,
                                self.stats, on_batch)
        return statistics

    @torch.no_grad()
    def readers(self, index: int) -> dict[str, str]:
        """Which statistic each projection of block ``index`` reads (see :class:`BlockStatistics`), from
        the block's structure: one forward pass over the first batch that accumulates nothing."""
        block = self._ready(index)
        statistics = BlockStatistics("probe")
        with parameters_in(block, self.compute_dtype):
            _collect_statistics(block, self.layers(index), self.hidden[:1], self._inputs.kwargs[index][:1], None,
                                statistics, self.stats)
        return statistics.readers

    @torch.no_grad()
    def prune(self, index: int, statistics: BlockStatistics | None = None, *,
              fixed_masks: Mapping[str, torch.Tensor] | None = None,
              layers: Mapping[str, Matrix] | None = None, uncovered: str = "error") -> dict[str, PruneResult]:
        """Prune block ``index`` (``layers`` of it, all its matrices in scope when None) from
        ``statistics`` and write the pruned weights into the model. Returns full name -> result.

        ``fixed_masks`` (full name -> keep-mask) gives masks instead of choosing them; SparseGPT then
        only refits the kept weights. Magnitude pruning needs no statistics.

        A matrix whose statistic has no sample (an expert no calibration token was routed to) is
        handled as ``uncovered`` says: ``error`` raises one line naming it, ``magnitude`` prunes it
        by magnitude, ``dense`` leaves it as it is (it is then absent from the result). Either way
        it is recorded in :attr:`uncovered` (full name -> what was done).
        """
        if uncovered not in UNCOVERED:
            raise ValueError(f"uncovered={uncovered!r}: use one of {', '.join(UNCOVERED)}")
        layers = dict(self.layers(index) if layers is None else layers)
        if self.offload:
            self.blocks[index].to(self.device)
        if statistics is None:
            statistics = BlockStatistics(STATISTIC_KINDS.get(self.spec.method, "none"))
        missing = [] if self.spec.method == "magnitude" else [
            name for name in layers
            if statistics.values.get(statistics.readers.get(name, name)) is None
            or statistics.values[statistics.readers[name]].samples == 0]
        for name in missing:
            full_name = self.full_name(index, name)
            if uncovered == "error":
                raise UserError(f"{full_name}: no calibration token reached it (an expert the router never chose "
                                "on these windows); add calibration data, or set federation.uncovered to magnitude "
                                "or dense")
            self.uncovered[full_name] = uncovered
            log.warning("%s: no calibration token reached it; %s (uncovered: %s)", full_name,
                        "pruned by magnitude" if uncovered == "magnitude" else "left dense", uncovered)
        magnitude = PruneSpec("magnitude", self.spec.sparsity, self.spec.n, self.spec.m)
        # Layers that share a statistic are pruned together (q/k/v, gate/up); the others one by one.
        groups: dict[str, list[str]] = {}
        for name in layers:
            if name in missing and uncovered == "dense":
                continue
            key = statistics.readers.get(name, name)
            groups.setdefault(f"uncovered:{name}" if name in missing else key, []).append(name)
        pruned: dict[str, PruneResult] = {}
        for key, names in groups.items():
            full_names = [self.full_name(index, name) for name in names]
            weights = [get_weight(layers[name]).detach() for name in names]
            for full_name, weight in zip(full_names, weights):
                if not all_finite(weight):
                    raise NumericalError(f"{full_name}: weight contains NaN or inf")
            keeps = [fixed_masks.get(full_name) if fixed_masks is not None else None for full_name in full_names]
            spec, statistic = (magnitude, None) if key.startswith("uncovered:") else (self.spec, statistics.values.get(key))
            pruned.update(zip(names, _prune_group(full_names, spec, weights, statistic, keeps)))
        results = {}
        for name, result in pruned.items():
            set_weight(layers[name], result.weight)
            results[self.full_name(index, name)] = result
        self.stats.layers_pruned += len(pruned)
        self.stats.blocks_pruned += bool(layers)
        return results

    def finish(self) -> None:
        """End of the walk. With offload the whole model goes back to the host, so that nothing is
        left split across devices (the placement rule, :mod:`fedspallm.placement`)."""
        if self.offload:
            release(self.model)

    @torch.no_grad()
    def advance(self, index: int) -> list[torch.Tensor]:
        """Run the inputs through block ``index`` as it is now; returns its outputs, which are from now
        on the inputs of block ``index + 1``. With offload the block goes back to the CPU."""
        block = self._ready(index)
        kwargs = self._inputs.kwargs[index]
        with parameters_in(block, self.compute_dtype):
            self.hidden = [_first_output(block(h, **kw)) for h, kw in zip(self.hidden, kwargs)]
        self.stats.forward_passes += len(self.hidden)
        self.position = index + 1
        if self.offload:
            block.to("cpu")
        return self.hidden


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
    on_pruned: Callable[[dict[str, PruneResult]], None] | None = None,
    uncovered: str = "error",
    collect: Callable[[SequentialCalibration, int], BlockStatistics] | None = None,
    groups: Sequence[int] | None = None,
) -> SequentialResult:
    """Prune ``blocks_to_prune`` (all blocks when None) of ``model`` on ``windows`` ([n, seqlen] token ids).

    The loop of :class:`SequentialCalibration`'s steps: per block, collect the statistics, prune from
    them, and run the windows through the pruned block to feed the next.

    ``restore_dense`` puts each block's original weights back once its pruned outputs are computed:
    later blocks still see pruned inputs (as the pruning client would), but the model leaves this
    function as it came in. Federated clients use it to keep their dense cache across rounds.

    ``prune_from`` maps full module names to the weights a selected block is loaded with before its
    statistics are gathered and it is pruned; its pruned outputs still feed the next block. Federated
    clients that calibrate on the global model pass their dense cache: re-pruning an already pruned
    matrix to the same target would only find its own zeros again (zeros score lowest in every
    pruner). ``fixed_masks`` (full module name -> keep-mask) gives the mask instead of letting the
    pruner choose it; SparseGPT then only refits the kept weights.

    ``uncovered`` says what happens to a matrix no calibration token reaches (an expert the router
    never chose): see :meth:`SequentialCalibration.prune`; ``result.uncovered`` lists them.

    ``collect(calibration, index)`` gives the statistics a block is pruned from (by default
    ``calibration.collect(index)``): ``centralized`` sums its batches in ``fedstats``' fixed point this
    way, with ``groups`` (the clients' shares of ``windows``) keeping every batch within one client.

    ``on_pruned`` receives each block's results (full name -> result) as soon as the block is pruned,
    and ``result.pruned`` then stays empty: a caller that keeps them in another form (a federated
    client's uploads) never holds every pruned block twice.
    """
    blocks = find_decoder_blocks(model)
    selected = sorted(set(range(len(blocks)) if blocks_to_prune is None else blocks_to_prune))
    check_prunable(model, selected, spec)
    last_selected = selected[-1] if selected else -1
    # Later blocks' outputs are needed only by a caller that asks for them.
    through = len(blocks) - 1 if on_block_output is not None else last_selected
    calibration = SequentialCalibration(model, windows, spec, batch_size=batch_size, device=device, offload=offload,
                                        through=max(through, 0), groups=groups)
    result = SequentialResult(stats=calibration.stats, uncovered=calibration.uncovered)
    needs_data = spec.method != "magnitude"
    # Magnitude pruning reads no inputs: unless the caller wants the outputs, nothing runs forward at all.
    propagate = needs_data or on_block_output is not None

    for index in range(through + 1):
        layers = calibration.layers(index) if index in selected else {}
        original = {name: get_weight(layer).detach().clone() for name, layer in layers.items()} if restore_dense else {}
        if prune_from is not None:
            for name, layer in layers.items():
                set_weight(layer, prune_from[calibration.full_name(index, name)])
        statistics = None
        if layers and needs_data:
            statistics = calibration.collect(index) if collect is None else collect(calibration, index)
        release_freed_memory()  # the forward's activations are freed: give them back before the solves
        if layers:
            pruned = calibration.prune(index, statistics, fixed_masks=fixed_masks, uncovered=uncovered)
            (result.pruned.update if on_pruned is None else on_pruned)(pruned)
            release_freed_memory()  # and the solves' buffers before the next forward
        if propagate:
            calibration.advance(index)
        elif offload:
            blocks[index].to("cpu")
        for name, layer in layers.items():
            if restore_dense:
                set_weight(layer, original[name])
        if on_block_output is not None:
            on_block_output(index, calibration.hidden)
        if on_block is not None:
            on_block(index, len(blocks))
        release_freed_memory()  # the block's working buffers are freed: give them back (fedspallm.allocator)
    calibration.finish()
    return result


def first_reader(seen: dict[tuple, tuple[str, weakref.ref]], name: str, inputs: torch.Tensor) -> str:
    """The first layer of the current pass that read ``inputs`` (``name`` if none did before it).

    ``seen`` maps a tensor's address, shape and strides to that layer and a weak reference to the
    tensor. While the reference is alive the memory cannot have been reused by another input at the
    same address; once it is dead, a new tensor there is a new input. A strong reference would keep
    every input of the block alive to the end of the forward (0.05 GB per 8 x 512 batch on the
    default model, at the MLP's peak)."""
    key = (inputs.data_ptr(), tuple(inputs.shape), tuple(inputs.stride()))
    earlier = seen.get(key)
    if earlier is None or earlier[1]() is None:
        earlier = seen[key] = (name, weakref.ref(inputs))
    return earlier[0]


def _collect_statistics(
    block: nn.Module,
    layers: dict[str, Matrix],
    hidden: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    kind: str | None,
    statistics: BlockStatistics,
    counters: SequentialStats,
    on_batch: Callable[[BlockStatistics], None] | None = None,
) -> None:
    """One forward pass over the block with hooks; layers that read the same tensor share a statistic.
    With ``kind`` None nothing is accumulated: only ``statistics.readers`` is filled in.

    Every matrix in ``layers`` ends with a reader; one that no token reached (an expert the router
    never chose) reads a statistic of its own with zero samples. With ``on_batch`` every batch's
    statistics go to it as they are and ``statistics`` keeps only the readers."""
    accumulate = accumulate_hessian if kind == "hessian" else accumulate_sq_norms
    seen: dict[tuple, tuple[str, weakref.ref]] = {}  # see first_reader

    def add(name: str, inputs: torch.Tensor) -> None:
        stat = statistics.values.setdefault(name, Statistic(kind))
        stat.value, stat.samples = accumulate(stat.value, stat.samples, inputs.detach())
        stat.tokens += inputs.numel() // inputs.shape[-1]
        counters.statistic_updates += 1

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            inputs = args[0]
            owner = first_reader(seen, name, inputs)
            statistics.readers.setdefault(name, owner)
            if owner == name and kind is not None:  # else the same tensor as an earlier layer's: share it
                add(name, inputs)

        return hook

    experts: dict[nn.Module, dict[tuple[str, int], str]] = {}
    for name, layer in layers.items():
        if isinstance(layer, ExpertMatrix):
            experts.setdefault(layer.module, {})[(layer.param, layer.index)] = name
            statistics.readers[name] = name  # an expert's input is its own routed tokens

    def on_expert_input(name: str, inputs: torch.Tensor) -> None:
        if kind is not None:
            add(name, inputs)

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()
               if not isinstance(layer, ExpertMatrix)]
    try:
        with _routed_inputs(experts, on_expert_input):
            for h, kw in zip(hidden, kwargs):
                seen.clear()
                block(h, **kw)
                counters.forward_passes += 1
                if on_batch is not None and kind is not None:
                    on_batch(BlockStatistics(kind, statistics.readers, statistics.values))
                    statistics.values = {}
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        if name not in statistics.readers:
            statistics.readers[name] = name  # no input ever reached it
        key = statistics.readers[name]
        if kind is not None and on_batch is None and key not in statistics.values:
            width = in_features(layers[key])
            shape = (width, width) if kind == "hessian" else (width,)
            statistics.values[key] = Statistic(kind, torch.zeros(shape, dtype=torch.float32), 0, 0)


class _ExpertInputs(TorchFunctionMode):
    """Inside an experts module's eager forward: every ``linear(x, W[e])`` or ``x @ W[e]`` whose weight
    is expert e's slice of a watched fused parameter W reports x as that expert matrix's input."""

    def __init__(self, watched: dict[str, torch.Tensor], names: dict[tuple[str, int], str],
                 report: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.watched, self.names, self.report = watched, names, report

    def _expert(self, weight: Any) -> tuple[str, int] | None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        for param_name, param in self.watched.items():
            if (weight.shape == param.shape[1:] and weight.stride() == param.stride()[1:]
                    and weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()):
                return param_name, (weight.storage_offset() - param.storage_offset()) // param.stride(0)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS or func in _MATMUL_FUNCS:
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            hit = self._expert(weight)
            name = self.names.get(hit) if hit is not None else None
            if name is not None:
                self.report(name, args[0])
        return func(*args, **kwargs)


_LINEAR_FUNCS = (torch.nn.functional.linear,)
_MATMUL_FUNCS = (torch.matmul, torch.Tensor.__matmul__, torch.mm)


@contextmanager
def _routed_inputs(experts: dict[nn.Module, dict[tuple[str, int], str]],
                   report: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, each fused-experts module runs its eager forward (the per-expert loop, which
    transformers keeps as the undecorated forward; grouped kernels see all experts at once) and
    reports every expert matrix's routed input: its own tokens, and for the down projection the
    activations of those tokens."""
    saved = {}
    for module, names in experts.items():
        forward = type(module).forward
        eager = getattr(forward, "__wrapped__", forward)
        watched = {param: getattr(module, param) for param, _ in names}

        def run(*args: Any, _module=module, _eager=eager, _watched=watched, _names=names, **kwargs: Any) -> Any:
            reported: list[str] = []

            def note(name: str, inputs: torch.Tensor) -> None:
                reported.append(name)
                report(name, inputs)

            with _ExpertInputs(_watched, _names, note):
                output = _eager(_module, *args, **kwargs)
            if not reported and args and isinstance(args[0], torch.Tensor) and args[0].numel():
                raise UserError(f"{type(_module).__name__}: its forward does not apply one expert's slice of "
                                f"{', '.join(_watched)} at a time, so the tokens routed to each expert can't be "
                                "followed; exclude these experts with pruning.ignore")
            return output

        saved[module] = module.__dict__.get("forward")
        module.forward = run
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
