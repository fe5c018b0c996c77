"""What a client uploads for one pruned matrix, held in its wire form until its block is reduced.

A process keeps its clients' pruned matrices between the client work and the reduce of their block
(:mod:`fedspallm.federated.strategies.round_based`). Held as float64 sums and int32 counts they would
take 12 bytes per weight; held as the upload itself, a packed bitmask and the kept values in the
model's dtype, they take 1/8 + (1 - s)·itemsize bytes (1.3 bytes per float32 weight at 70%), and the
sums of a block are built only when that block is reduced. Packing is exact: :meth:`Upload.contribution`
gives bit for bit the :func:`~fedspallm.federated.aggregation.contribute` of the original matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


class UploadStore:
    """What a process's clients uploaded, full name -> :class:`Upload` (or the sums of two or more), until
    their block is reduced.

    With a ``scratch`` directory every holding goes to its own safetensors file, in a directory of
    this store's own inside it, as soon as it is made, and is read back (and deleted) when its block
    is reduced: the process holds no client's uploads in memory between the client work and the
    reduce, as a client that has sent its message keeps no copy. On the default run that is 0.07 GB
    per process by the end of the clients' pass; on Llama-2-7B at 50% with fp16 values, 3.6 GB
    (``bench/memory_plan.py``). The directory goes when the store is closed or collected, or the
    process exits. Without ``scratch`` they stay in memory (in-process runs and tests). Reading
    back gives the same bits."""

    def __init__(self, scratch: str | os.PathLike | None = None) -> None:
        self.directory: Path | None = None
        self._remove: Callable[[], Any] = lambda: None
        if scratch is not None:
            Path(scratch).mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix=".uploads-", dir=scratch))
            self._remove = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self._held: dict[str, Upload | Contribution | None] = {}  # None: on disk

    def add(self, name: str, upload: Upload) -> None:
        """Hold one more client's upload for ``name`` (with what this process already holds for it)."""
        held = add(self.pop(name), upload)
        if self.directory is None:
            self._held[name] = held
            return
        if isinstance(held, Upload):
            tensors = {"mask": held.mask, "values": held.values}
            metadata = {"shape": json.dumps(list(held.shape))}
        else:
            tensors = {"weight_sum": held.weight_sum, "keep_count": held.keep_count}
            metadata = {"contributors": str(held.contributors)}
        save_file(tensors, self._path(name), metadata=metadata)
        self._held[name] = None

    def pop(self, name: str) -> Upload | Contribution | None:
        """What is held for ``name`` (None if nothing), and no longer held."""
        if name not in self._held:
            return None
        held = self._held.pop(name)
        if held is not None:
            return held
        path = self._path(name)
        with safe_open(path, "pt") as file:
            metadata = file.metadata()
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        path.unlink()
        if "shape" in metadata:
            return Upload(torch.Size(json.loads(metadata["shape"])), tensors["mask"], tensors["values"])
        return Contribution(tensors["weight_sum"], tensors["keep_count"], int(metadata["contributors"]))

    def __contains__(self, name: object) -> bool:
        return name in self._held

    def __len__(self) -> int:
        return len(self._held)

    def close(self) -> None:
        """Forget everything held and remove the directory."""
        self._held.clear()
        self._remove()

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.safetensors"


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
