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

Threads: glibc gives each new thread an arena of its own (up to 8 per core), made of heaps
of at most 64 MiB, so a thread's larger requests are mapped per use whatever the thresholds
say. A model actor runs its models on threads (its encode and cascade stages,
device_stages.py), so on CPU the thresholds did not hold there: a tiny-model encode of 16
images took 1.1 s on the main thread against 3.2 s on a worker thread (2.1 million page
faults), and a decode of 16 pairs on a thread faults its [16, 4096, 256] buffers in anew
every time (the tests). One arena, the main heap, for every thread fixes that, but only
from the process's start: glibc fixes its arena limit once the first arenas exist and
hands new threads the arenas of ended ones, so `mallopt(M_ARENA_MAX, 1)` inside a running
actor changed nothing (measured).

Even on the main heap glibc does not keep everything: torch allocates with
`posix_memalign`, and a large block freed and asked for again at the same size is not
reused (a 96 MiB tensor, made again and again: faulted in anew each time), which is the
vit_b encoder's pattern (its 0.8 GB attention maps, its MLP buffers, layer after layer).
gperftools' tcmalloc keeps and reuses such spans on every thread: vit_b's CPU encode of one
image took 5.4-5.5 s with it against 8.5-8.7 s with glibc, peak RSS 3.8 against 3.9 GB
(development machine, main thread).

So `process_environment` is what the CPU model actors start with (run.py passes it as
their Ray runtime_env): one glibc arena, and tcmalloc preloaded where the driver's machine
has it (Debian/Ubuntu: libtcmalloc-minimal4, the image installs it; a node without it
logs the dynamic loader's one-line warning and runs on glibc's one arena), unless the
driver's environment says PERSAM_CPU_ALLOCATOR=glibc. On the development machine (2 vCPU,
`persam bench --job --model-type tiny --checkpoint random:0 --images 96 --concepts 1
--device cpu`) the job went from 3.5 images/s at steady state to 4.7-5.1 with one arena
and 5.4 with tcmalloc too; a vit_b job of 8 images from 0.10 to 0.15 images/s (whole run).
The cost of one arena, one lock for every thread's malloc, is small beside CPU tensor work.
GPU actors keep glibc's default: their threads allocate little on the host, and neither
setting has been measured there.

Where the C library is not glibc (macOS, musl), this does nothing (the variables of
`process_environment` are glibc's and ld.so's, ignored elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
ONE_ARENA = {"MALLOC_ARENA_MAX": "1"}  # glibc reads it at start-up: every thread allocates from the main heap
TCMALLOC = "tcmalloc_minimal"  # gperftools' allocator, preloaded into CPU model processes where installed
# The driver's environment variable that keeps CPU model actors on glibc (=glibc): an operator's way back
ALLOCATOR_CHOICE = "PERSAM_CPU_ALLOCATOR"
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


def process_environment(models_on: str) -> dict[str, str]:
    """Environment variables for a process about to start that will run models on
    `models_on` ("cpu" | "cuda"): on CPU, one glibc arena for all its threads and, where this
    machine has it, tcmalloc preloaded (module docstring); none on a GPU."""
    if models_on != "cpu":
        return {}
    environment = dict(ONE_ARENA)
    wanted = os.environ.get(ALLOCATOR_CHOICE, "tcmalloc") != "glibc"
    preload = ctypes.util.find_library(TCMALLOC) if wanted and sys.platform.startswith("linux") else None
    if preload:  # its soname: the dynamic loader finds it on the node as it does any library
        environment["LD_PRELOAD"] = preload
    return environment
