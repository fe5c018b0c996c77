"""The client role: prune the sampled blocks of a local model on private windows, report what it would upload."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedspallm.calibration import PruneSpec, prune_sequential
from fedspallm.federated.aggregation import upload_bytes
from fedspallm.pruners import PruneResult


@dataclass
class ClientUpdate:
    client_id: int
    round_index: int
    blocks: list[int]
    upload_bytes: int
    tokens: int


def mask_upload_bytes(mask: torch.Tensor) -> int:
    """FedPrLLM clients send only a bitmask."""
    return math.ceil(mask.numel() / 8)


def client_round(
    model: nn.Module,
    windows: torch.Tensor,
    spec: PruneSpec,
    blocks: Sequence[int],
    client_id: int,
    round_index: int,
    send: Callable[[str, PruneResult], None],
    *,
    masks_only: bool = False,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    offload: bool = False,
    prune_from: Mapping[str, torch.Tensor] | None = None,
    fixed_masks: Mapping[str, torch.Tensor] | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> ClientUpdate:
    """One client's local work in one round. The model comes back exactly as it went in.

    Each pruned matrix goes to ``send(full name, result)`` as soon as its block is pruned (what the
    client uploads; the caller keeps it in upload form), so no client holds all its pruned blocks.
    Calibration still runs through every block up to the last sampled one, so that a sampled block
    sees inputs shaped by the blocks this client pruned before it, as in SparseGPT. With
    ``prune_from`` (the dense cache, while the model holds the global model) the sampled blocks start
    from the dense weights and the blocks not sampled are the global model's.
    With ``fixed_masks`` (a refit round) the server knows the masks, so only the kept values are sent.
    """
    dtype = next(model.parameters()).dtype
    sent = 0

    def receive(pruned: dict[str, PruneResult]) -> None:
        nonlocal sent
        for name, r in pruned.items():
            if masks_only:
                sent += mask_upload_bytes(r.mask)
            elif fixed_masks is not None:
                sent += int(torch.count_nonzero(r.mask)) * dtype.itemsize
            else:
                sent += upload_bytes(r.mask, dtype)
            send(name, r)

    prune_sequential(
        model, windows, spec, blocks, batch_size=batch_size, device=device, offload=offload,
        restore_dense=True, prune_from=prune_from, fixed_masks=fixed_masks, on_block=on_block, on_pruned=receive,
    )
    return ClientUpdate(client_id, round_index, sorted(blocks), sent, int(windows.numel()))
