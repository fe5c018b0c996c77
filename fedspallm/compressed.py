"""Compressed sparse export: each pruned matrix as a packed bitmask plus its kept values, in safetensors.

A dense checkpoint of a 70%-sparse model is as large as the dense one, because zeros are stored.
Here a pruned [out, in] matrix costs out*in/8 bytes of mask plus its non-zeros; everything else
(embeddings, norms, biases) is stored as it is. ``load_compressed`` rebuilds a normal transformers
model from the file alone (the model config travels in the safetensors metadata).

Layout of ``model_compressed.safetensors``, format version 1 (the README says why it is our own):

- metadata ``format``: ``"fedspallm-bitmask-v1"`` (name and version); ``config``: the model's
  ``config.to_json_string(use_diff=False)``; ``shapes``: JSON ``{weight key: [out, in]}`` of the
  pruned matrices;
- for each pruned matrix ``K`` (``<module>.weight``): ``K::mask``, uint8, the row-major keep mask
  (1 = kept, i.e. non-zero) packed big-endian 8 per byte (``numpy.packbits``), ``ceil(out*in/8)``
  bytes; ``K::values``, the kept values in row-major order, in the weight's dtype;
- every other tensor of the state dict under its own name, as it is (tied tensors once).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedspallm.errors import UserError
from fedspallm.models import prunable_state_keys

FORMAT_NAME = "fedspallm-bitmask"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}-v{FORMAT_VERSION}"


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor
    return state


def save_compressed(model: nn.Module, path: Path) -> Path:
    """Write ``model`` to ``path`` (atomically) with every prunable matrix as bitmask + values."""
    state = _unique_state(model)
    sparse = prunable_state_keys(model)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if key in sparse:
            keep = tensor != 0
            bits = np.packbits(keep.flatten().numpy())
            tensors[f"{key}::mask"] = torch.from_numpy(bits)
            tensors[f"{key}::values"] = tensor[keep].contiguous()
            shapes[key] = list(tensor.shape)
        else:
            tensors[key] = tensor
    metadata = {"format": FORMAT, "config": model.config.to_json_string(use_diff=False), "shapes": json.dumps(shapes)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_compressed(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a plain transformers causal LM from a file written by :func:`save_compressed`."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such compressed checkpoint")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types on truncated or corrupt files
        raise UserError(f"{path}: not a readable safetensors file ({err})".splitlines()[0]) from None
    written = metadata.get("format") or ""
    name, _, version = written.rpartition("-v")
    if name != FORMAT_NAME:
        raise UserError(f"{path}: not a fedspallm compressed checkpoint (format {written or None!r})")
    if version != str(FORMAT_VERSION):
        raise UserError(f"{path}: compressed format version {version}, but this fedspallm reads version "
                        f"{FORMAT_VERSION} only ({FORMAT}); load it with the fedspallm that wrote it")
    config_dict = json.loads(metadata["config"])
    config = AutoConfig.for_model(**config_dict)
    shapes = json.loads(metadata["shapes"])
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith("::mask") or key.endswith("::values"):
            continue
        state[key] = tensor
    for key, shape in shapes.items():
        numel = int(np.prod(shape))
        keep = torch.from_numpy(np.unpackbits(tensors[f"{key}::mask"].numpy(), count=numel).astype(bool))
        values = tensors[f"{key}::values"]
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[keep] = values
        state[key] = dense.view(shape)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or next(iter(state.values())).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"{path}: checkpoint does not match its config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.eval()
    return model
