"""The dense cache: the unpruned weight of every prunable matrix, for the strategies that read it.

Who reads it: a round that starts again from the dense model (``client_base: dense`` after round 1),
clients that calibrate on the global model but prune from dense weights (``client_base: global``,
refit rounds), ``mask_vote`` (it prunes the dense weights), and the server's magnitude pruning of
uncovered blocks. A single-round ``fedspallm``/``fedavg`` run reads none, and holds none.

Where it comes from: the model's checkpoint on disk when its safetensors files hold every prunable
matrix exactly as loaded (checked bit for bit when the cache is made). A matrix is then read from the
memory-mapped file when it is needed and dropped after use, so the cache costs no memory between
uses. Otherwise (a model built in memory, a converted or re-typed checkpoint) it is a host copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from fedspallm.models import get_weight, is_transposed, prunable_modules
from fedspallm.placement import HOST


def _safetensors_index(directory: Path) -> dict[str, Path]:
    """Tensor key -> file, for a directory with model.safetensors or a sharded safetensors index."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}


def _local_directory(checkpoint: str | Path | None) -> Path | None:
    """The directory of the checkpoint: itself, or a hub id's snapshot in the local cache."""
    if checkpoint is None:
        return None
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(checkpoint), local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not in the cache: no file to read from
        return None


def _read(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.get_tensor(key).clone()  # our own memory: the mapping closes with the handle


class DenseSource(Mapping):
    """Full module name -> its dense [out, in] weight on the host, read on demand (see the module doc)."""

    def __init__(self, model: nn.Module, checkpoint: str | Path | None = None) -> None:
        layers = prunable_modules(model)
        self._transposed = {name: is_transposed(layer) for name, layer in layers.items()}
        self._files: dict[str, Path] = {}
        self._held: dict[str, torch.Tensor] = {}
        directory = _local_directory(checkpoint)
        index = _safetensors_index(directory) if directory is not None else {}
        if index and all(f"{name}.weight" in index for name in layers) and all(
                torch.equal(_read(index[f"{name}.weight"], f"{name}.weight"), layer.weight.detach().to(HOST))
                for name, layer in layers.items()):
            self._files = {name: index[f"{name}.weight"] for name in layers}
        else:
            self._held = {name: get_weight(layer).detach().to(HOST, copy=True) for name, layer in layers.items()}

    @property
    def on_disk(self) -> bool:
        return bool(self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        weight = _read(self._files[name], f"{name}.weight")
        return weight.t() if self._transposed[name] else weight

    def __iter__(self) -> Iterator[str]:
        return iter(self._transposed)

    def __len__(self) -> int:
        return len(self._transposed)
