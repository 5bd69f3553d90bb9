"""What a process does with the memory a case freed before the next case: evaluate gives it
back (`release`: its peak follows the largest case, not the number of cases); ingest's
workers keep it (`keep_freed`: the next case reuses it without faulting it in).

In evaluate two things held a case (measured on LiTS-sized cases, 448x512x512, one model: 1.9 GB of
anonymous memory after one case, 2.9 GB after four):
- **Reference cycles.** MONAI's surface distances try an optional import (cucim) on every
  call; the failed import's traceback, kept in a cycle, holds the frames above it, and with
  them the case's prediction and truth volumes. Python's cycle collector runs by counts of
  objects made, not bytes, so whole cases waited for it.
- **glibc's heap.** What a process frees stays with it for later allocations; a case's
  many mid-sized arrays (the network's batches, scipy's labels) leave free pages scattered
  among live ones. `malloc_trim(0)` hands them back.
`release` does both, once per case; `trim` alone is milliseconds.

Ingest's workers want the opposite (`keep_freed`): each makes case after case of about the
same size, and glibc hands every large array back to the kernel when it is freed (it maps
them apart: all over 32 MiB, smaller ones above a threshold that moves), so the next case
faults all its pages in again: 5.6 million minor faults, 14 s of kernel time in 78 s for 32
cases of 448x512x512, and two workers faulting at once slowed each other (the kernel time
grew by half).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (glibc's malloc.h)


@cache
def _glibc(function: str):
    """A glibc malloc function, or None (musl, macOS, Windows: nothing to call)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def trim() -> None:
    """Return the heap's free pages to the operating system (a no-op without glibc):
    milliseconds."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def keep_freed() -> None:
    """From now on this process keeps what it frees for its next allocations: no separate
    mappings for large arrays, no trimming of the heap. For a worker process that repeats
    one job (its peak stays that of its largest job); never for a long-lived process."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def release() -> None:
    """Collect reference cycles, then trim: a third of a second with torch and MONAI loaded
    (the collector walks every object), so once per case, after its metrics."""
    gc.collect()
    trim()
