"""What a client uploads for one pruned matrix, held in its wire form until its block is reduced.

A process keeps its clients' pruned matrices between the client work and the reduce of their block
(:mod:`fedspallm.federated.strategies.round_based`). Held as float64 sums and int32 counts they would
take 12 bytes per weight; held as the upload itself, a packed bitmask and the kept values in the
model's dtype, they take 1/8 + (1 - s)·itemsize bytes (1.3 bytes per float32 weight at 70%), and the
sums of a block are built only when that block is reduced. Packing is exact: :meth:`Upload.contribution`
gives bit for bit the :func:`~fedspallm.federated.aggregation.contribute` of the original matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch

from fedspallm.federated.aggregation import Contribution, contribute, merge
from fedspallm.placement import HOST

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # the first position is the top bit


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 positions per byte, first position in the top bit (as numpy.packbits)."""
    flat = mask.reshape(-1).to(HOST, torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.reshape(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed.reshape(-1, 1) & _BITS) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


@dataclass
class Upload:
    """One client's pruned [out, in] matrix: a packed keep-mask and the kept values, on the host."""

    shape: torch.Size
    mask: torch.Tensor  # uint8, packed (see pack_mask)
    values: torch.Tensor  # the kept weights in mask order, in the model's dtype

    @classmethod
    def of(cls, weight: torch.Tensor, mask: torch.Tensor) -> Upload:
        mask = mask.to(HOST, torch.bool)
        return cls(weight.shape, pack_mask(mask), weight.detach().to(HOST)[mask].clone())

    def keep(self) -> torch.Tensor:
        return unpack_mask(self.mask, self.shape)

    def contribution(self) -> Contribution:
        """The sums of this one contributor: Σ M⊙W (float64) and Σ M (int32)."""
        keep = self.keep()
        weight = torch.zeros(self.shape, dtype=self.values.dtype)
        weight[keep] = self.values
        return contribute(None, weight, keep)


def add(held: Upload | Contribution | None, upload: Upload) -> Upload | Contribution:
    """A process's holding for one matrix plus one more client's upload: the upload alone while it is the
    only one, the sums once there are two."""
    if held is None:
        return upload
    sums = held.contribution() if isinstance(held, Upload) else held
    return merge(sums, upload.contribution())


def as_contribution(held: Upload | Contribution) -> Contribution:
    return held.contribution() if isinstance(held, Upload) else held


class PackedMasks(MutableMapping):
    """Full name -> keep-mask (bool), stored packed: 1/8 byte per weight instead of one.

    The global masks of a federation (kept for refit rounds, the round logs and the checkpoint) as a
    mapping that unpacks a mask when it is read; ``dict(masks)`` gives plain bool tensors."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self._packed: dict[str, tuple[torch.Size, torch.Tensor]] = {}
        self.update(masks or {})

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._packed[name] = (mask.shape, pack_mask(mask.to(torch.bool)))

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, packed = self._packed[name]
        return unpack_mask(packed, shape)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)
