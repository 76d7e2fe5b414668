"""The host allocator setting: large CPU tensors stay in the heap between uses (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from jobs.pipeline.host_memory import keep_large_buffers


def glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


DECODE_FAULTS = """
import resource, sys, torch
from jobs.pipeline.host_memory import keep_large_buffers
from persam_core.decoder_speed import decode_eager
from persam_core.models import build_random
if sys.argv[1] == "kept":
    assert keep_large_buffers() and keep_large_buffers()  # applies, and again
sam, count = build_random("tiny", 0).eval(), 8  # the decoder is SAM's full-size one: [8, 4096, 256] tokens
args = (torch.randn(count, 256, 64, 64), torch.zeros(count, 2, 2), torch.tensor([[1, 0]] * count), None,
        torch.randn(count, 1, 256, 256), True, None, None)
with torch.no_grad():
    decode_eager(sam, *args)
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        decode_eager(sam, *args)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts))  # the steady state: now and then the heap grows once more (kept: 8-45 thousand faults)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and glibc()), reason="glibc's allocator only")
def test_a_decoder_pass_stops_mapping_its_buffers_anew():
    """Page faults of a decode of 8 pairs (the fewest of three, after a first one): glibc maps
    and unmaps its large buffers on every use by default (90-290 thousand faults each here);
    with the setting they stay in the heap (0)."""
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", DECODE_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    default, kept = faults("default"), faults("kept")
    assert default > 20_000 and kept < default / 10, (default, kept)


def test_it_is_set_in_every_process_that_runs_models():
    import inspect

    from jobs import cli
    from jobs.pipeline import actors

    assert "keep_large_buffers()" in inspect.getsource(cli.main)
    assert "keep_large_buffers()" in inspect.getsource(actors.ModelActor.__init__)
    assert keep_large_buffers() in (True, False)
