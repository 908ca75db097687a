"""The C allocator under CPU tensors: glibc's malloc, set so that a CPU run's resident memory follows its tensors
(docs/design.md section 6).

PyTorch allocates CPU tensors with ``posix_memalign``. glibc serves a request of 128 KiB or more with its own
``mmap`` and unmaps it when freed, but each time such a block is freed it raises that threshold to the block's
size (up to 32 MiB) and the trim threshold to twice that: from the first training step on, most activations come
from the heap, and the heap keeps what is freed (it gives back only a free top larger than the trim threshold).
A step frees hundreds of MiB of activations in backward; the process then holds them as free heap for good.
:func:`release_freed_tensors` fixes both thresholds at glibc's initial 128 KiB, so every tensor above it has its
own mapping, returned to the system when the tensor is freed (mid-size model at 256 px: see benchmarks/REPORT.md
section 5 for the resident memory and the step's time, before and after).

Linux with glibc only (``mallopt`` is glibc's); elsewhere nothing changes. A user's own ``MALLOC_MMAP_THRESHOLD_``
or ``MALLOC_TRIM_THRESHOLD_`` wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # glibc's own initial value, made fixed
USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def glibc():
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def release_freed_tensors() -> str:
    """Fix glibc's mmap and trim thresholds at 128 KiB (see the module docstring). Returns what the C allocator
    runs with, for summary.json and the memory report."""
    for var in USER_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]} (yours)"
    libc = glibc()
    if libc is None:
        return "the platform's malloc (unchanged: not glibc)"
    ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    if not ok:  # pragma: no cover - glibc refuses only values out of its range
        return "glibc malloc (mallopt refused the thresholds: unchanged)"
    return (f"glibc malloc, mmap and trim thresholds fixed at {THRESHOLD // 1024} KiB (freed tensors go back to the "
            "system)")


def trim() -> bool:
    """Give the free memory inside glibc's heaps back to the system now (``malloc_trim(0)``); False off glibc."""
    libc = glibc()
    return bool(libc is not None and libc.malloc_trim(0))
