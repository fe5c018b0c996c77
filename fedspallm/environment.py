"""What a result was measured on: library versions, model file, code, threads, CPU, BLAS and accelerator.

Perplexities of pruned models move between machines (a different BLAS kernel sums in another order,
and SparseGPT's sequential updates amplify the last bits), so every ``results.json`` carries its
environment, and the experiment driver refuses to put results from different environments into one
table (:func:`environment_key`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from fedspallm.assets import sha256_of

LIBRARIES = ("torch", "transformers", "gguf", "lightning", "safetensors", "cryptography", "numpy")
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")
_VECTOR_FLAGS = re.compile(r"^(sse4_[12]|avx\w*|fma|f16c|amx\w*|neon|asimd\w*|sve\w*)$")
# Keys whose difference makes two results incomparable; the commit is recorded but not part of it.
COMPARABLE_KEYS = ("python", "libraries", "torch_threads", "cpu", "vector_extensions", "blas", "aten_cpu_kernel",
                   "accelerator")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_files_sha256(source: str | Path) -> dict[str, str]:
    """sha256 of every weight file the model was loaded from (a local directory or a cached hub snapshot)."""
    directory = Path(source)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(source), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached or not a hub id: nothing on disk to hash
            return {}
    files = sorted({f for pattern in _WEIGHT_FILES for f in directory.glob(pattern)})
    return {f.name: sha256_of(f) for f in files}


def git_state(directory: Path | None = None) -> dict[str, Any]:
    """The commit of the checkout this package runs from, and whether its tree differs from it."""
    root = directory or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_description() -> tuple[str, list[str]]:
    """The CPU model name and its vector extensions (from /proc/cpuinfo on Linux)."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and value.strip():
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = sorted(f for f in value.split() if _VECTOR_FLAGS.match(f))
    return name, flags


def blas_description() -> str:
    """The BLAS torch was built with, as its build configuration names it (e.g. 'mkl 2024.2')."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    name = blas.group(1) if blas else "unknown"
    version = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    return f"{name} {version.group(1)}" if version and name == "mkl" else name


def accelerator_description() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    return {
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
    }


def describe_environment(model_source: str | Path | None = None) -> dict[str, Any]:
    """The environment record of ``results.json`` (``model_source``: where the weights were loaded from)."""
    cpu, vector = cpu_description()
    return {
        "python": platform.python_version(),
        "libraries": library_versions(),
        "model_files_sha256": model_files_sha256(model_source) if model_source is not None else {},
        "git": git_state(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "vector_extensions": vector,
        "blas": blas_description(),
        "aten_cpu_kernel": torch.backends.cpu.get_cpu_capability(),
        "accelerator": accelerator_description(),
        "platform": platform.platform(),
    }


def environment_key(environment: dict[str, Any] | None) -> tuple:
    """What must be equal for two results to share a table (None: a result that recorded no environment)."""
    if not environment:
        return (None,)
    return tuple((key, repr(environment.get(key))) for key in COMPARABLE_KEYS)


def environment_difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """The first key on which two environments differ, as 'key: a != b' (for the driver's error line)."""
    if not a or not b:
        return "one result records no environment (it predates environment recording)"
    for key in COMPARABLE_KEYS:
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} != {b.get(key)!r}"
    return ""
