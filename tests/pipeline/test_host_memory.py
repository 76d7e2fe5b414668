"""The host allocator setting: large CPU tensors stay in the heap between uses (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
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
from persam_core.decoder_speed import decode_eager
from persam_core.models import build_random
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
        for _ in range(3):
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


def faults_in_fresh_process(script: str, *argv: str, env: dict | None = None) -> int:
    """The page-fault count `script` prints, run in a fresh process started without the
    allocator variables of this one, plus `env`."""
    base = {name: value for name, value in os.environ.items() if name not in ALLOCATOR_VARIABLES}
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, check=True,
                          env={**base, **(env or {})})
    return int(done.stdout.split()[-1])


def decode_faults(mode: str, pairs: int, where: str, env: dict | None = None) -> int:
    """Page faults of a decode of `pairs` pairs on the main thread or a thread (DECODE_FAULTS)."""
    return faults_in_fresh_process(DECODE_FAULTS, mode, str(pairs), where, env=env)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and glibc()), reason="glibc's allocator only")
def test_a_decoder_pass_stops_mapping_its_buffers_anew():
    """Page faults of a decode of 8 pairs (the fewest of three, after a first one): glibc maps
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


@pytest.mark.skipif(not TCMALLOC_HERE, reason="optional library tcmalloc (gperftools) is not installed here")
def test_tcmalloc_keeps_a_block_that_glibc_maps_anew_each_time():
    """A 96 MiB tensor made again and again: glibc faults it in anew every time after the first
    (24,576 pages each here, thresholds raised or not), the preloaded tcmalloc reuses it (0)."""
    glibc = faults_in_fresh_process(REPEATED_BLOCK)
    tcmalloc = faults_in_fresh_process(REPEATED_BLOCK, env={"LD_PRELOAD": TCMALLOC_HERE})
    assert glibc > 20_000 and tcmalloc < glibc / 10, (glibc, tcmalloc)


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
