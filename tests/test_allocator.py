"""Returning freed heap memory to the OS between stages (fedspallm.allocator)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc_trim is glibc's")

WORKER = """
import torch
from fedspallm.allocator import release_freed_memory
from fedspallm.cli import tune_allocator

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:"))

assert tune_allocator()  # the CLI's settings: tensors below 4 MB come from the heap, freed memory is kept
tensors = [torch.ones(1 << 18) for _ in range(300)]  # 300 x 1 MB, touched
keep = torch.ones(1 << 10)  # allocated after them: the freed memory is not at the heap's top alone
del tensors
kept = rss_mb()
released = release_freed_memory()
print(kept, rss_mb(), released)
"""


def test_freed_heap_memory_goes_back_to_the_os():
    # A fresh process: the allocator's state is this test's alone.
    done = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    kept, after, released = done.stdout.split()
    assert released == "True"
    assert int(kept) - int(after) >= 250  # the 300 MB the tensors held, less what the allocator reuses
