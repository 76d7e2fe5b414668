"""The host allocator: large tensor buffers stay in the process between uses (glibc).

By default glibc's malloc maps large requests with a fresh `mmap` and gives freed memory at
the top of the heap back, so CPU tensors of a few MiB and more are faulted in and zeroed
again on every use. The mask decoder on CPU allocates many ([P, 4096, 256] fp32 tokens,
4 MiB per pair), so the mmap and trim thresholds are raised (`mallopt`, in every process
that runs models). The cost: up to the trim threshold of freed memory stays with the
process, which reuses it on its next batch.

Threads: glibc gives each new thread an arena of its own, made of heaps of at most 64 MiB,
so a thread's larger requests are mapped per use whatever the thresholds say; a model actor
runs its models on threads (device_stages.py). One arena for every thread fixes that, but
only from the process's start (glibc fixes its arena limit once the first arenas exist), so
it is an environment variable of the actor's process, not a `mallopt`. Even the main heap
does not reuse a large block that torch frees and asks for again at the same size
(`posix_memalign`), the vit_b encoder's pattern; gperftools' tcmalloc does.

So `process_environment` is what the CPU model actors start with (run.py passes it as their
Ray runtime_env): one glibc arena, and tcmalloc preloaded where the driver's machine has it
(Debian/Ubuntu: libtcmalloc-minimal4; a node without it logs the dynamic loader's one-line
warning and runs on glibc's one arena), unless the driver's environment says
PERSAM_CPU_ALLOCATOR=glibc. GPU actors keep glibc's default: their threads allocate little
on the host. The measurements behind each setting: docs/performance.md.

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
# Up to 1 GiB freed at the heap's top is kept: less, and a decode whose freed buffers happen
# to gather at the top (how they do depends on the order threads free them, so on the load)
# is given back after every decode and faulted in again (docs/performance.md).
TRIM_THRESHOLD = 4 * THRESHOLD


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
