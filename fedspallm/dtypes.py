"""Compute dtypes apart from the storage dtype: evaluation (``eval.dtype``) and calibration forwards
(``pruning.calibration_dtype``) run the model in another dtype than its weights are kept in.

The weights are never converted in place: :func:`parameters_in` swaps in cast copies and puts the
original tensors back, so a float32 model computed in bfloat16 keeps its float32 weights bit for
bit (``model.to(bfloat16).to(float32)`` would round them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedspallm.errors import UserError


def check_compute_dtype(dtype: torch.dtype, device: torch.device, what: str) -> None:
    """One clear line for a dtype this device cannot compute in: float16 on the CPU, bfloat16 on a
    CUDA GPU without bfloat16 support."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError(f"{what}=float16: CPUs are offered bfloat16 or float32 only (float16 is for CUDA)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{what}={name}: this GPU ({torch.cuda.get_device_name(device)}) does not support "
                        "bfloat16; use float32")


def check_run_dtypes(calibration_dtype: str | None, eval_dtype: str | None, accelerator: str) -> None:
    """Before launch: :func:`check_compute_dtype` for ``pruning.calibration_dtype`` and ``eval.dtype`` on the
    device the run will compute on (runtime.accelerator, or the launcher's)."""
    from fedspallm.placement import compute_device_type

    device = torch.device(compute_device_type(accelerator))
    for key, value in (("pruning.calibration_dtype", calibration_dtype), ("eval.dtype", eval_dtype)):
        if value is not None:
            check_compute_dtype(getattr(torch, value), device, key)


@contextmanager
def parameters_in(module: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Every floating-point parameter of ``module`` cast to ``dtype`` for the duration of the block.

    The original tensors are put back afterwards untouched. Buffers (rotary frequency tables) keep
    their dtype: the models compute from them in float32 anyway. ``None``, or parameters already in
    ``dtype``: nothing is cast.
    """
    saved = []
    if dtype is not None:
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                saved.append((param, param.data))
                param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


def cast_floats(value: Any, dtype: torch.dtype, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """``value`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``:
    the hidden states and keyword arguments (rotary cos/sin, additive masks) a block receives, as the
    model would produce them if it were in ``dtype``. ``memo`` (id -> cast) casts a tensor that
    appears several times once, so that the copies stay shared as the originals were."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        if id(value) not in memo:
            memo[id(value)] = value.to(dtype)
        return memo[id(value)]
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype, memo) for v in value)
    if isinstance(value, list):
        return [cast_floats(v, dtype, memo) for v in value]
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype, memo) for k, v in value.items()}
    return value
