"""glibc malloc settings for CPU training: keep freed memory for reuse.

A CPU training step allocates and frees activation tensors of tens of megabytes.
glibc serves blocks that large with ``mmap`` and returns them with ``munmap``, so
every step faults in (and zeroes) the same pages again: on a 2-core machine a
quarter of the CPU time went to the kernel. PyTorch's CPU tuning guide answers
this with jemalloc or tcmalloc through ``LD_PRELOAD``; the allocator already
loaded does the same with three settings: no ``mmap`` for large blocks, never trim
the heap, one arena (Ray Train runs the loop in a thread, and a thread's own arena
grows and shrinks with each step).

Peak memory stays what a step needs; the process keeps it between steps instead of
giving it back. Two ways in: ``worker_env()`` for processes about to start (Ray
Train workers, through ``GLIBC_TUNABLES``, read when a process starts) and
``keep_freed_memory()`` for the running process (``mallopt``; it cannot move
threads that already have an arena). Both are no-ops for other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

NEVER_TRIM = 2**31 - 1      # the largest threshold mallopt takes (an int)
# Each setting as its GLIBC_TUNABLES name, its mallopt option (glibc's <malloc.h>) and value.
SETTINGS = (
    ("glibc.malloc.mmap_max", -4, 0),               # M_MMAP_MAX
    ("glibc.malloc.trim_threshold", -1, NEVER_TRIM),  # M_TRIM_THRESHOLD
    ("glibc.malloc.arena_max", -8, 1),              # M_ARENA_MAX
)


def worker_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment for a new process: ``GLIBC_TUNABLES`` with these settings first,
    then any the caller already sets (which therefore win)."""
    ours = ":".join(f"{name}={value}" for name, _, value in SETTINGS)
    theirs = environ.get("GLIBC_TUNABLES", "").strip(":")
    return {"GLIBC_TUNABLES": f"{ours}:{theirs}" if theirs else ours}


def keep_freed_memory() -> bool:
    """Apply the settings to this process; False where the C library is not glibc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    if not hasattr(libc, "gnu_get_libc_version"):
        log.info("allocator settings skipped: the C library is not glibc")
        return False
    for _, option, value in SETTINGS:
        if libc.mallopt(option, value) != 1:
            raise OSError(f"glibc refused mallopt({option}, {value})")
    return True
