"""Giving the C allocator's freed memory back to the operating system between stages.

The CLI tunes glibc malloc to keep freed memory for reuse (:func:`fedspallm.cli.tune_allocator`):
within a stage that saves page faults, but the kept memory counts in the process's resident set, and
across the many differently sized buffers of a calibration pass it grows (measured on the default
4-process run: 0.41 GB of freed heap per process after the clients' pass, against 0.07 GB of live
uploads). So each stage that churns through working buffers ends by returning what it freed: the
calibration engine after each step of every block (the forward that collects statistics, the solves,
the forward that feeds the next block), and the prune recipe after loading and tokenizing and before
evaluation. Inside a step the allocator still reuses its memory.
"""

from __future__ import annotations

import ctypes
import platform


def release_freed_memory() -> bool:
    """Return the freed memory of every malloc arena to the OS (glibc ``malloc_trim(0)``); the live
    memory is untouched. Does nothing off glibc. Returns whether anything was released."""
    if platform.system() != "Linux":
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
    return bool(trim(0))
