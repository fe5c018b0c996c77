"""Where everything lives: the one placement rule, with and without ``pruning.offload``.

"device" is the process's compute device (``fabric.device``: its GPU under CUDA, else the CPU);
"host" is the CPU. The rule, stage by stage:

=============================  ==========================================  ==========================================
what                           offload false                               offload true (needs an accelerator)
=============================  ==========================================  ==========================================
model, after loading           device                                      host
calibration (one client walk)  device: the whole model                     device: the embeddings, rotary tables and
                                                                           final norm, and the one block being
                                                                           calibrated; the other blocks on the host.
                                                                           After the walk the whole model is back on
                                                                           the host (:func:`release`)
activations, per-block         device                                      device
statistics (H, Σx²)
client uploads (bitmask +      disk, under output.dir (:class:`fedspallm.federated.uploads.UploadStore`), each read
kept values)                   back to the host at its block's reduce; the host in in-process runs
the process's local sums       host, one block at a time                   host
pooled sums (Σ M⊙W float64,    host, one block at a time (kept across      host
Σ M int32, contributors)       rounds only where a later round, a
                               checkpoint or paired evaluation reads them)
collective buffers             the backend's device (:func:`collective_device`: the CUDA device for NCCL, the host
                               for gloo), one bucket at a time; results come back to the inputs' device
aggregation (ℓ0 average,       host; the result is written into the        host; written into the model on the host
expansion, mask vote)          model on the device
global masks                   host                                        host
dense cache                    not held unless the strategy reads it; then the model's checkpoint on disk, read one
                               block at a time (:class:`fedspallm.federated.dense.DenseSource`), else a host copy
evaluation and export          the whole model on the device               the whole model on one device
                                                                           (:func:`evaluation_device`): the
                                                                           accelerator if it fits there, else host
=============================  ==========================================  ==========================================

Nothing hands a host tensor to NCCL: every collective stages its buffer on :func:`collective_device`.
``bench/memory_plan.py`` walks this rule on a meta-device model to size a run before it starts.
"""

from __future__ import annotations

import os
import torch
from torch import nn

from fedspallm.errors import UserError

HOST = torch.device("cpu")


def accelerator_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def run_accelerator(accelerator: str) -> str:
    """runtime.accelerator, or ``fabric run --accelerator X``'s, which arrives through the environment."""
    from lightning.fabric.connector import _is_using_cli

    return os.environ.get("LT_ACCELERATOR", accelerator) if _is_using_cli() else accelerator


def compute_device_type(accelerator: str) -> str:
    """The device type the run's processes will compute on: cpu, cuda or mps."""
    accelerator = run_accelerator(accelerator)
    if accelerator == "cpu" or not accelerator_available():
        return "cpu"
    return "cuda" if accelerator != "mps" and torch.cuda.is_available() else "mps"


def check_offload(offload: bool, accelerator: str) -> None:
    """``pruning.offload true`` moves blocks from the host to an accelerator: refuse a run that has none."""
    if not offload:
        return
    accelerator = run_accelerator(accelerator)
    if compute_device_type(accelerator) == "cpu":
        reason = "runtime.accelerator=cpu" if accelerator == "cpu" else "no CUDA or MPS device is available"
        raise UserError(f"pruning.offload=true keeps the model on the CPU and moves one block at a time to an "
                        f"accelerator, but this run has none ({reason}); set pruning.offload false")


def load_device(device: torch.device | str, offload: bool) -> torch.device:
    """Where the model lives from loading until calibration starts."""
    return HOST if offload else torch.device(device)


def collective_device(backend: str | None = None) -> torch.device:
    """The device a collective's buffers must be on: the current CUDA device for NCCL, the host otherwise."""
    import torch.distributed as dist

    if backend is None:
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return HOST


def evaluation_device(model: nn.Module, device: torch.device | str, offload: bool, reserve_bytes: int = 0) -> torch.device:
    """The one device the whole pruned model is evaluated and exported on.

    Without offload it is ``device``. With offload it is the accelerator when the model plus
    ``reserve_bytes`` (activations, logits) fit in its free memory, else the host."""
    device = torch.device(device)
    if not offload or device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    missing = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.device != device)
    return device if missing + reserve_bytes <= free else HOST


def release(model: nn.Module) -> None:
    """After an offloaded walk: the whole model back on the host (nothing left split across devices)."""
    model.to(HOST)


def place_whole(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Put every parameter and buffer of ``model`` on ``device`` (evaluation, export)."""
    return model.to(torch.device(device))


def devices_of(model: nn.Module) -> set[torch.device]:
    """The devices the model's parameters and buffers are on: one, for a model ready to evaluate or export."""
    return {t.device for t in [*model.parameters(), *model.buffers()]}
