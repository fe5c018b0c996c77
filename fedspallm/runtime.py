"""Fabric set-up shared by every command: one process per client group, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import logging
import os
import platform
import resource
import warnings
from datetime import timedelta

import torch
from lightning.fabric import Fabric
from lightning.fabric.connector import _is_using_cli
from lightning.fabric.strategies import DDPStrategy

from fedspallm.config import RuntimeConfig


def quiet_libraries() -> None:
    """Our own progress and summary are the output; silence the libraries' chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "lightning", "lightning.fabric", "lightning.pytorch", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def make_fabric(runtime: RuntimeConfig, collective_timeout_s: float = 600.0, loggers=None) -> Fabric:
    """A launched Fabric. Under ``fabric run`` the processes exist already and must not be launched again."""
    launched_by_cli = _is_using_cli()
    devices = os.environ.get("LT_DEVICES", runtime.devices) if launched_by_cli else runtime.devices
    num_nodes = int(os.environ.get("LT_NUM_NODES", runtime.num_nodes)) if launched_by_cli else runtime.num_nodes
    processes = int(devices) * num_nodes if str(devices).isdigit() else 2
    strategy = (
        DDPStrategy(timeout=timedelta(seconds=collective_timeout_s), process_group_backend=None)
        if processes > 1
        else "auto"
    )
    if launched_by_cli:  # the launcher's flags arrive through the environment; ours must not contradict them
        fabric = Fabric(accelerator="auto", devices="auto", num_nodes=1, strategy=strategy, loggers=loggers)
    else:
        fabric = Fabric(accelerator=runtime.accelerator, devices=runtime.devices, num_nodes=runtime.num_nodes,
                        strategy=strategy, loggers=loggers)
    if not launched_by_cli:
        fabric.launch()
    local_processes = max(1, fabric.world_size // max(1, num_nodes))
    threads = runtime.threads or max(1, (os.cpu_count() or 1) // local_processes)
    torch.set_num_threads(threads)
    return fabric


def rank_zero_progress(fabric: Fabric, enabled: bool) -> bool:
    return enabled and fabric.global_rank == 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (since the last :func:`reset_peak_rss`, where the OS supports it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux); False where the OS can't, and the peak then covers the process."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
