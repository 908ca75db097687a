"""The C allocator under CPU tensors: glibc's malloc, set so that a CPU run's resident memory follows its tensors
(docs/design.md section 6).

PyTorch allocates CPU tensors with ``posix_memalign``. glibc serves a request of 128 KiB or more with its own
``mmap`` and unmaps it when freed, but each time such a block is freed it raises that threshold to the block's
size (up to 32 MiB) and the trim threshold to twice that: from the first training step on, most activations come
from the heap, and the heap keeps what is freed (it gives back only a free top larger than the trim threshold).
A step frees hundreds of MiB of activations in backward; the process then holds them as free heap for good.
:func:`release_freed_tensors` fixes both thresholds (the mmap threshold at ``cpu_malloc_threshold_kib``, the trim
threshold at twice it), so every tensor above the threshold has its own mapping, returned to the system when the
tensor is freed. The threshold trades speed for resident memory: each mapping costs page faults when it is first
written (system CPU time), and blocks under the threshold stay in the heap once freed. glibc's initial 128 KiB
follows the tensors most closely and was 20-25% slower per step than TRL's AlignPropTrainer on the mid-size model;
1 MiB (the default) was at least as fast as TRL on it and on the toy world in every repeat, for about 50 MiB more
resident memory on the mid-size model (benchmarks/REPORT.md sections 5 and 6).
``cpu_malloc_threshold_kib=0`` leaves glibc's own moving thresholds (fastest, keeps freed activations).

Linux with glibc only (``mallopt`` is glibc's); elsewhere nothing changes. A user's own ``MALLOC_MMAP_THRESHOLD_``
or ``MALLOC_TRIM_THRESHOLD_`` wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
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


def users_setting() -> str | None:
    """The user's own ``MALLOC_*`` threshold variable (``NAME=value``), which wins over ours; None when unset."""
    return next((f"{var}={os.environ[var]}" for var in USER_VARS if os.environ.get(var)), None)


def release_freed_tensors(threshold_kib: int) -> str:
    """Fix glibc's mmap threshold at ``threshold_kib`` and its trim threshold at twice it (see the module docstring;
    0 leaves glibc's own). Returns what the C allocator runs with, for summary.json and the memory report."""
    if (yours := users_setting()):
        return f"{yours} (yours)"
    libc = glibc()
    if libc is None:
        return "the platform's malloc (unchanged: not glibc)"
    if threshold_kib == 0:
        return "glibc malloc, its own moving thresholds (cpu_malloc_threshold_kib=0: freed tensors stay in the heap)"
    mmap_bytes = threshold_kib * 1024
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_bytes) == 1
    if not ok:  # pragma: no cover - glibc refuses only values out of its range (Config.validate keeps them in it)
        return "glibc malloc (mallopt refused the thresholds: unchanged)"
    return (f"glibc malloc, mmap threshold fixed at {threshold_kib} KiB and trim threshold at {2 * threshold_kib} KiB "
            f"(freed tensors above {threshold_kib} KiB go back to the system)")


class wider_threshold:
    """Inside the block (a no-grad render: the sample grid, the judged images) glibc keeps blocks up to ``kib`` in its
    heap instead of mapping and unmapping each one (each new mapping page-faults as it is first written); at the end
    the run's own thresholds come back and the freed heap is given back (malloc_trim). Nothing when the run fixed no
    threshold (``base_kib`` 0, a user's variables, not glibc)."""

    def __init__(self, base_kib: int, kib: int = 32768):
        self.base_kib, self.kib = base_kib, kib
        self.libc = None if not base_kib or users_setting() else glibc()

    def __enter__(self):
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, self.kib * 1024)
            self.libc.mallopt(M_TRIM_THRESHOLD, 2 * self.kib * 1024)
        return self

    def __exit__(self, *exc):
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, self.base_kib * 1024)
            self.libc.mallopt(M_TRIM_THRESHOLD, 2 * self.base_kib * 1024)
            self.libc.malloc_trim(0)
        return False
