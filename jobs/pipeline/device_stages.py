"""A model actor's device work as two stages: encode, then cascade, two chunks at a time.

Ray Data runs up to two calls of an actor at once (run.py). `DeviceStages.run` makes them
a two-stage pipeline: the encoder stage (one call at a time, under a lock) only queues its
chunk's encoder work on the device, and the cascade stage runs on the actor's one cascade
thread, so while one chunk's cascade runs (many small kernels launched from Python), the
next chunk's encoder work is already queued and the GPU has it to run whenever the
cascade leaves it waiting for the host. Unpacking and packing happen outside both.

One cascade thread: torch keeps CUDA graphs (--decoder-graphs) per thread, so one thread
records each decoder shape once and replays it for every chunk (two call threads would
each record and hold their own).

One cascade stream (CUDA): a stream runs its kernels in the order they were queued, and a
host read waits for everything queued before it. On one stream, the next chunk's encoder
batch, queued by the other call while a cascade is still launching its kernels, lands
among them, and the cascade's final read (its masks leaving the device) then waits for
that whole encoder batch too: the call returns later, Ray hands the actor its next chunk
later, and the GPU idles between encoder batches. On a stream of its own the cascade waits
only for its own kernels and for its chunk's features (an event recorded after the
encoder work), and its small kernels may run beside the encoder's. The stream has the
higher priority: where both have kernels waiting, the GPU schedules the cascade's first,
so a chunk's results leave soon and the encoder fills what is left.

Memory: the features are allocated on the encoder's stream and read on the cascade's.
The cascade's stream is synchronised when its stage ends (normally or not), before the
features can be freed (the caller holds them until the cascade returns), so the caching
allocator never hands their memory to the encoder while the cascade still reads it (what
`Tensor.record_stream` would otherwise be needed for). Each stream keeps its own cached
blocks: the cascade's working memory is not reused by the encoder, a few GB more at many
pairs. Off CUDA (CPU actors, the tests) there is no stream: the stages differ only in
their thread.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import torch

HIGH_PRIORITY = -1  # CUDA stream priorities: 0 is the default, lower numbers run first
Encoded = TypeVar("Encoded")
Result = TypeVar("Result")


class CascadeStream:
    """One actor's cascade stream on `device` (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device, priority=HIGH_PRIORITY) if device.type == "cuda" else None

    def mark_encoded(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the calling thread's stream (a chunk's
        encoder work and feature copies) -> what the chunk's cascade waits for."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @contextlib.contextmanager
    def running_after(self, encoded: torch.cuda.Event | None) -> Iterator[None]:
        """The block's device work on the cascade stream, queued after `encoded`; the
        stream synchronised when the block ends (the features may be freed after it)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            if encoded is not None:
                self.stream.wait_event(encoded)
            try:
                yield
            finally:
                self.stream.synchronize()


class DeviceStages:
    """The encoder lock, the cascade thread and the cascade stream of one model on `device`.

    cascade_thread=False (one caller, one call at a time: the local runner): nothing to
    overlap, so each cascade runs on the calling thread (still on the cascade stream). That
    thread also keeps the process's allocator tuning, which a new thread's arena loses on
    CPU (jobs/pipeline/host_memory.py)."""

    def __init__(self, device: torch.device, cascade_thread: bool = True) -> None:
        self.encode_lock = threading.Lock()
        self.cascade_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade") if cascade_thread else None
        self.cascade_stream = CascadeStream(device)

    def run(self, encode: Callable[[], Encoded], cascade: Callable[[Encoded], Result]) -> Result:
        """encode() on the calling thread, one caller at a time (it queues device work: no host
        read unless a cache needs the features), then cascade(its result) on the cascade
        thread and stream -> the cascade's result. Callable from several threads at once."""
        with self.encode_lock:
            encoded = encode()
            done = self.cascade_stream.mark_encoded()
        if self.cascade_thread is None:
            return self._cascade(cascade, encoded, done)
        return self.cascade_thread.submit(self._cascade, cascade, encoded, done).result()

    def close(self) -> None:
        """Stop the cascade thread once its queued cascades are done (an actor's ends with its process)."""
        if self.cascade_thread is not None:
            self.cascade_thread.shutdown()

    def _cascade(self, cascade: Callable[[Encoded], Result], encoded: Encoded, done: torch.cuda.Event | None) -> Result:
        with self.cascade_stream.running_after(done):
            return cascade(encoded)
