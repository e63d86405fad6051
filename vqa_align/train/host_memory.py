"""Host (CPU) memory settings for training: keep freed memory in the process for the next step.

A training step allocates and frees the same large tensors every step (activations, the aligners'
(rows, width) buffers). By default glibc's malloc gives big blocks back to the kernel: blocks above
a dynamic threshold (at most 32 MiB) are mmap'ed and unmapped one by one, and free memory at the
top of the heap is trimmed once it exceeds twice that threshold. Each step then page-faults and
zeroes the same memory again: 50,000-180,000 minor faults per MCAN-small CT step at batch 64 on
the 2-core CPU, about a third of an aligner's time measured alone (BENCHMARKS.md, session 3).
With a high mmap threshold and no trimming, a step reuses the previous step's memory and the
faults go to zero.

The price: the resident size stays at the step's high-water mark instead of dropping between
steps, which for a training loop is where it returns every step anyway. Only glibc has these
knobs (``mallopt``); elsewhere this does nothing. ``train.keep_freed_memory: false`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc <malloc.h>); the values are C ints.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, so they are reused
TRIM_THRESHOLD = 2**31 - 1  # the largest C int: the heap top is never given back


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (once per process); True if applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("glibc malloc keeps freed memory: %s", applied)
    return applied
