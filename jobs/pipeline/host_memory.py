"""The host allocator: large tensor buffers stay in the process between uses (glibc).

By default glibc's malloc maps large requests with a fresh `mmap` (its threshold adapts
up to 32 MiB) and gives freed memory at the top of the heap back (trim threshold), so
CPU tensors of a few MiB and more are faulted in and zeroed again on every use. The mask
decoder on CPU allocates many: its token tensors are [P, 4096, 256] fp32, 4 MiB per pair.
Measured on the development machine (2 vCPU, glibc 2.36), one multimask decode of 8 pairs
after a first one: 100-165 thousand page faults by default, 0-3 thousand with the
thresholds raised; the vit_b decoder took 70 against 32 ms per pair at P = 8, and 2.1
against 1.05 s at P = 32. This is what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
do when set before start-up; `mallopt` sets them from inside the process.

The cost: up to TRIM_THRESHOLD of freed memory stays with the process instead of going
back to the system (peak RSS of `persam bench` on vit_b, CPU: 3.7 GB before, 4.0 GB with
both thresholds at 256 MiB, 4.0 GB with the trim threshold at 512 MiB, 5.3 GB with both at
1 GiB, where the encoder's 0.8 GB attention maps stayed too). A model process reuses it on
its next batch.

Where the C library is not glibc (macOS, musl), this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
THRESHOLD = 256 << 20  # requests up to 256 MiB (64 pairs of tokens) come from the heap
# Up to 512 MiB freed at the heap's top is kept. At 256 MiB, a decode of 8 pairs on the
# batched path (whose buffers peak near 200 MiB) left more than that free at the top in 4 of
# 16 processes, which glibc trimmed after every decode and faulted in again (60-66 thousand
# faults each); at 512 MiB, 0 in 32 of 32.
TRIM_THRESHOLD = 2 * THRESHOLD


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process -> whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has no such thresholds
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        logger.debug("mallopt refused the allocator thresholds; large CPU tensors are mapped per use")
    return applied
