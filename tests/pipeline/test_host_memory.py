"""The host allocator setting: large CPU tensors stay in the heap between uses (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys

import pytest

from jobs.pipeline import host_memory
from jobs.pipeline.host_memory import ONE_ARENA, keep_large_buffers, process_environment


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


DECODE_FAULTS = """
import resource, sys, threading, torch
from jobs.pipeline.host_memory import keep_large_buffers
from persam_core.speed.decoder_speed import decode_eager
from persam_core.modeling.models import build_random
mode, count, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "kept":
    assert keep_large_buffers() and keep_large_buffers()  # applies, and again
sam = build_random("tiny", 0).eval()  # its decoder is SAM's full-size one: [count, 4096, 256] tokens
args = (torch.randn(count, 256, 64, 64), torch.zeros(count, 2, 2), torch.tensor([[1, 0]] * count), None,
        torch.randn(count, 1, 256, 256), True, None, None)
counts = []
def decode():
    with torch.no_grad():
        decode_eager(sam, *args)
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            decode_eager(sam, *args)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if where == "thread":  # as a model actor's cascade stage
    thread = threading.Thread(target=decode)
    thread.start()
    thread.join()
else:
    decode()
print(min(counts))  # the steady state: now and then the heap grows once more (kept: 8-45 thousand faults)
"""


ALLOCATOR_VARIABLES = ("MALLOC_ARENA_MAX", "LD_PRELOAD")  # what process_environment may set
# The suite's own cap on torch threads (tests/conftest.py) is left out too: the fresh process
# decodes on torch's own thread count, as a model actor with this machine's cores does (on one
# thread the buffers differ, and one arena still maps some of them anew).
LEFT_OUT = (*ALLOCATOR_VARIABLES, "OMP_NUM_THREADS")


def faults_in_fresh_process(script: str, *argv: str, env: dict | None = None) -> int:
    """The page-fault count `script` prints, run in a fresh process started without the
    allocator variables and the thread cap of this one, plus `env`."""
    base = {name: value for name, value in os.environ.items() if name not in LEFT_OUT}
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True,
                          env={**base, **(env or {})})
    return int(done.stdout.split()[-1])


def decode_faults(mode: str, pairs: int, where: str, env: dict | None = None) -> int:
    """Page faults of a decode of `pairs` pairs on the main thread or a thread (DECODE_FAULTS)."""
    return faults_in_fresh_process(DECODE_FAULTS, mode, str(pairs), where, env=env)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and glibc()), reason="glibc's allocator only")
def test_a_decoder_pass_stops_mapping_its_buffers_anew():
    """Page faults of a decode of 8 pairs (the fewest of five, after a first one): glibc maps
    and unmaps its large buffers on every use by default (90-290 thousand faults each here);
    with the setting they stay in the heap (0)."""
    default, kept = decode_faults("default", 8, "main"), decode_faults("kept", 8, "main")
    assert default > 20_000 and kept < default / 10, (default, kept)


def test_it_is_set_in_every_process_that_runs_models():
    import inspect

    from jobs import cli
    from jobs.pipeline import actors

    assert "keep_large_buffers()" in inspect.getsource(cli._guarded)  # every command runs through it
    assert "keep_large_buffers()" in inspect.getsource(actors.ModelActor.__init__)
    assert keep_large_buffers() in (True, False)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and glibc()), reason="glibc's allocator only")
def test_a_cpu_model_process_keeps_its_threads_decoder_buffers():
    """The same decode, of 16 pairs, on a thread as the actor's cascade stage runs it: a
    thread's own arena (heaps of at most 64 MiB) maps its [16, 4096, 256] buffers anew on
    every decode whatever the thresholds (about 340 thousand faults each here); a process
    started with one arena allocates them from the main heap (0)."""
    default = decode_faults("kept", 16, "thread")
    one_arena = decode_faults("kept", 16, "thread", ONE_ARENA)
    assert default > 50_000 and one_arena < default / 10, (default, one_arena)


REPEATED_BLOCK = """
import resource, torch
counts = []
for _ in range(4):  # torch asks posix_memalign for the same 96 MiB each time, as a layer does per image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(96 << 20, dtype=torch.uint8)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(counts[1:]))
"""


TCMALLOC_HERE = ctypes.util.find_library(host_memory.TCMALLOC) if sys.platform.startswith("linux") else None

# What matters here of tcmalloc, in a few lines of C: a large block that is freed is kept and
# handed out again for the next request of its size, instead of going back to the kernel. It
# stands in where tcmalloc is not installed (gperftools is a system package that a clone's
# `make install` cannot bring), so that the preload path of process_environment is proved on
# every machine; where tcmalloc is installed, the test also runs the real one.
BLOCK_KEEPING_ALLOCATOR = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>

#define LARGE ((size_t)64 << 20)
#define SLOTS 16

static int (*next_memalign)(void **, size_t, size_t);
static void (*next_free)(void *);
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *live[SLOTS], *kept[SLOTS];  /* large blocks handed out; freed and kept for reuse */
static size_t live_size[SLOTS], kept_size[SLOTS];

__attribute__((constructor)) static void find_next(void) {
    next_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    next_free = dlsym(RTLD_NEXT, "free");
}

static int put(void **blocks, size_t *sizes, void *block, size_t size) {
    for (int i = 0; i < SLOTS; i++)
        if (!blocks[i]) { blocks[i] = block; sizes[i] = size; return 1; }
    return 0;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (size >= LARGE) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < SLOTS; i++)
            if (kept[i] && kept_size[i] == size && (size_t)kept[i] % alignment == 0) {
                *out = kept[i];
                kept[i] = NULL;
                put(live, live_size, *out, size);
                pthread_mutex_unlock(&lock);
                return 0;
            }
        pthread_mutex_unlock(&lock);
    }
    int rc = next_memalign(out, alignment, size);
    if (rc == 0 && size >= LARGE) {
        pthread_mutex_lock(&lock);
        put(live, live_size, *out, size);
        pthread_mutex_unlock(&lock);
    }
    return rc;
}

void free(void *block) {
    if (block) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < SLOTS; i++)
            if (live[i] == block) {
                live[i] = NULL;
                int keep = put(kept, kept_size, block, live_size[i]);
                pthread_mutex_unlock(&lock);
                if (keep) return;
                goto give_back;
            }
        pthread_mutex_unlock(&lock);
    }
give_back:
    if (next_free) next_free(block);  /* before the constructor (the loader's own frees): kept */
}
"""


@pytest.fixture(scope="module")
def block_keeping_allocator(tmp_path_factory) -> str:
    """BLOCK_KEEPING_ALLOCATOR built as a shared library -> its path. The C compiler is one the
    suite needs anyway (torch.compile's CPU code in the compile tests)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "no C compiler (cc) on PATH: the tests need one, as torch.compile on CPU does"
    folder = tmp_path_factory.mktemp("allocator")
    source, library = folder / "keep_blocks.c", folder / "libkeep_blocks.so"
    source.write_text(BLOCK_KEEPING_ALLOCATOR)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl", "-lpthread"],
                   check=True, capture_output=True)
    return str(library)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and glibc()), reason="glibc's allocator and ld.so's preload")
def test_a_preloaded_allocator_keeps_a_block_that_glibc_maps_anew_each_time(block_keeping_allocator, monkeypatch):
    """A 96 MiB tensor made again and again: glibc faults it in anew every time after the first
    (24,576 pages each here, thresholds raised or not); the allocator that the CPU model
    processes' environment preloads reuses it (0). That environment is process_environment's,
    with the stand-in found where tcmalloc would be; tcmalloc itself where this machine has it."""
    real_find = host_memory.ctypes.util.find_library
    monkeypatch.delenv(host_memory.ALLOCATOR_CHOICE, raising=False)
    monkeypatch.setattr(host_memory.ctypes.util, "find_library",
                        lambda name: block_keeping_allocator if name == host_memory.TCMALLOC else real_find(name))
    environment = process_environment("cpu")
    assert environment["LD_PRELOAD"] == block_keeping_allocator
    glibc = faults_in_fresh_process(REPEATED_BLOCK)
    kept = faults_in_fresh_process(REPEATED_BLOCK, env=environment)
    assert glibc > 20_000 and kept < glibc / 10, (glibc, kept)
    if TCMALLOC_HERE:  # the real one (the image installs it)
        tcmalloc = faults_in_fresh_process(REPEATED_BLOCK, env={"LD_PRELOAD": TCMALLOC_HERE})
        assert tcmalloc < glibc / 10, (glibc, tcmalloc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's and ld.so's variables")
def test_only_cpu_model_processes_get_the_allocator_environment(monkeypatch):
    """CPU model actors: one arena, and tcmalloc where this machine has it; GPU actors: nothing."""
    import ray

    from jobs.pipeline.session import plan_actors

    monkeypatch.delenv("PERSAM_CPU_ALLOCATOR", raising=False)
    monkeypatch.setattr(host_memory.ctypes.util, "find_library", lambda name: None)
    assert process_environment("cpu") == {"MALLOC_ARENA_MAX": "1"} and process_environment("cuda") == {}
    monkeypatch.setattr(host_memory.ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    assert process_environment("cpu") == {"MALLOC_ARENA_MAX": "1", "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert process_environment("cuda") == {}
    monkeypatch.setenv("PERSAM_CPU_ALLOCATOR", "glibc")  # an operator's way back to glibc
    assert process_environment("cpu") == {"MALLOC_ARENA_MAX": "1"}
    monkeypatch.delenv("PERSAM_CPU_ALLOCATOR")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert plan_actors("cpu", None).env == process_environment("cpu")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert plan_actors("auto", None).env == {} and plan_actors("cuda", None).count == 2
