"""The one reduce seam: every cross-process sum of client-derived data goes through a :class:`Reducer`.

The driver (``prune``, ``fit``) builds one reducer and hands it down; strategies, the reporter and
the checkpoint never touch a process group. ``PlainReducer`` sums in the clear; secure aggregation
implements the same protocol (:mod:`fedspallm.federated.secure_aggregation`) and is selected by
``federation.secure_aggregation`` in one place.

Kinds (what the tensors are; secure aggregation maps each to a public fixed-point encoding):
``weight_sum``, ``keep_count``, ``contributors``, ``votes``, ``hessian``, ``sq_norms``,
``fit_weights``, ``fit_losses`` and ``metadata`` (bytes, timings, perplexities of standalone clients: always plain).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from fedspallm.placement import collective_device

KINDS = ("weight_sum", "keep_count", "contributors", "votes", "hessian", "sq_norms", "fit_weights", "fit_losses",
         "metadata")
# Below the 32 MB above which the CLI lets glibc map (and page-fault) each allocation afresh (cli.tune_allocator):
# bucket buffers are then reused heap memory. The extra memory of a reduce is one bucket plus the sums.
DEFAULT_BUCKET_BYTES = 16 << 20


@runtime_checkable
class Reducer(Protocol):
    world_size: int

    def sum(self, tensors: Mapping[str, torch.Tensor], *, kind: str, tag: str) -> dict[str, torch.Tensor]:
        """Element-wise sum of each named tensor over all parties (processes).

        Same names, shapes, dtypes and call order on every rank. Returns new tensors on the device
        the inputs came from (CPU in, CPU out), whatever device the backend needs.
        kind: what the tensors are (see :data:`KINDS`); tag: where in the run, e.g. "round 3"."""
        ...


def written_bytes() -> int | None:
    """Bytes this process has written so far through write-family system calls, sockets included
    (``wchar`` of /proc/self/io, all threads); None where the file does not exist (not Linux)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown reduce kind {kind!r}; one of {', '.join(KINDS)}")


def buckets(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Names grouped into buckets of one dtype each, in the given order, each at most ``bucket_bytes``
    (a tensor larger than that is a bucket of its own)."""
    by_dtype: dict[torch.dtype, list[list[str]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        groups = by_dtype.setdefault(tensor.dtype, [[]])
        if groups[-1] and sizes[tensor.dtype] + nbytes > bucket_bytes:
            groups.append([])
            sizes[tensor.dtype] = 0
        groups[-1].append(name)
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + nbytes
    return [group for groups in by_dtype.values() for group in groups if group]


class PlainReducer:
    """Sums in the clear: one ``all_reduce(SUM)`` per bucket of same-dtype tensors.

    Tensors are flattened into one buffer per bucket on the backend's device (the accelerator for
    NCCL, the CPU for gloo) and the sums are copied back to the inputs' devices. In one process the
    sum is the input itself (no copy, no collective). ``calls`` counts the collectives issued and
    ``seconds`` the time spent in them.
    """

    def __init__(self, fabric: Any = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """``fabric`` None: the default process group if one is initialised (one process otherwise)."""
        if fabric is not None:
            self.world_size = fabric.world_size
        else:
            self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.bucket_bytes = bucket_bytes
        self.calls = 0
        self.seconds = 0.0
        self.handed_bytes = 0  # client-derived sums handed to the collective (kind metadata apart)
        self.metadata_bytes = 0
        self.wire_bytes = 0  # what this process wrote to its sockets during the collectives

    def sum(self, tensors: Mapping[str, torch.Tensor], *, kind: str, tag: str) -> dict[str, torch.Tensor]:
        check_kind(kind)
        if self.world_size == 1:
            return dict(tensors)  # the sum over one party: the inputs themselves
        started, written = time.perf_counter(), written_bytes()
        handed = sum(t.numel() * t.element_size() for t in tensors.values())
        if kind == "metadata":
            self.metadata_bytes += handed
        else:
            self.handed_bytes += handed
        device = collective_device()  # CUDA for NCCL, the host for gloo (fedspallm.placement)
        out: dict[str, torch.Tensor] = {}
        for names in buckets(tensors, self.bucket_bytes):
            flat = torch.cat([tensors[name].detach().reshape(-1).to(device) for name in names])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # no barrier first (fabric.all_reduce adds one per call)
            self.calls += 1
            offset = 0
            for name in names:
                source = tensors[name]
                out[name] = flat[offset:offset + source.numel()].reshape(source.shape).to(source.device)
                offset += source.numel()
        self.seconds += time.perf_counter() - started
        if written is not None:
            self.wire_bytes += written_bytes() - written
        return {name: out[name] for name in tensors}

    def stats(self) -> dict[str, Any]:
        """What results.json records about this process's collectives."""
        return {"secure_aggregation": False, "calls": self.calls, "collective_seconds": self.seconds,
                "handed_bytes": self.handed_bytes, "metadata_bytes": self.metadata_bytes,
                "wire_bytes": self.wire_bytes}


def collective_report(reducer: Any, rank: int) -> dict[str, Any]:
    """The reducer's figures for results.json, with every process's bytes on the wire (one metadata sum,
    not counted in the figures themselves): ``handed_bytes`` are the client-derived sums this process
    handed to the collectives (with secure aggregation, masked words; ``plain_bytes`` what the plain
    path would have handed), ``wire_bytes_per_process`` what each process wrote to its sockets."""
    stats = dict(reducer.stats())
    wire = torch.zeros(reducer.world_size, dtype=torch.int64)
    wire[rank] = int(stats.pop("wire_bytes"))
    if reducer.world_size > 1:
        wire = reducer.sum({"wire_bytes": wire}, kind="metadata", tag="end")["wire_bytes"]
    stats["wire_bytes_per_process"] = wire.tolist()
    return stats


def make_reducer(fabric: Any, *, secure: bool = False, seed: int = 0,
                 bounds: Mapping[str, Any] | None = None, switch: str = "federation.secure_aggregation") -> Reducer:
    """The run's one reducer: plain, or secure aggregation over a plain one.

    Every driver (prune, fit) builds its reducer here and nowhere else; ``secure`` is the value of its
    switch (``switch`` names the key, for the errors), ``bounds`` the overrides of the public encodings."""
    plain = PlainReducer(fabric)
    if not secure:
        return plain
    from fedspallm.federated.secure_aggregation import SecureReducer, encodings

    return SecureReducer(plain, 0 if fabric is None else fabric.global_rank, seed=seed, bounds=encodings(bounds),
                         switch=switch)


def broadcast_from_rank_zero(fabric: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """In place: every process gets rank 0's values (a server-side result, not a sum of client data).

    Each tensor travels on the backend's device (a host tensor is staged on the GPU for NCCL) and
    lands back where it was."""
    if fabric is None or fabric.world_size == 1:
        return
    device = collective_device()
    for tensor in tensors.values():
        staged = tensor if tensor.device == device else tensor.to(device)
        dist.broadcast(staged, src=0)
        if staged is not tensor:
            tensor.copy_(staged)
