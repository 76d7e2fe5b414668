"""The model actor's cascades on a CUDA stream of their own, apart from its encoder work.

Why: a CUDA stream runs its kernels in the order they were queued, and a host read waits
for everything queued before it. With one stream, the actor's two calls interleave there:
while one chunk's cascade is still launching its kernels (host-paced, see
persam_core/decoder_speed.py), the other call queues the next chunk's encoder batch behind
them, and the cascade's final read (its masks leaving the device) then waits for that
whole encoder batch as well. The call returns that much later, so Ray hands the actor its
next chunk late, and the GPU idles between encoder batches. On a stream of its own the
cascade waits only for its own kernels and for its chunk's features (an event recorded
after the encoder work), and its small kernels may run beside the encoder's. The stream
has the higher priority: where both have kernels waiting, the GPU schedules the
cascade's first, so a chunk's results leave soon and the encoder fills what is left.

Memory: the features are allocated on the encoder's stream and read on the cascade's.
The cascade's stream is synchronised when its block ends (normally or not), and the
features are freed only after that (the actor's call holds them until the cascade
returns), so the caching allocator never hands their memory to the encoder while the
cascade still reads it (what `Tensor.record_stream` would otherwise be needed for).
Each stream keeps its own cached blocks: the cascade's working memory is not reused by
the encoder, a few GB more at many pairs.

Off CUDA (CPU actors, the tests) every method is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

HIGH_PRIORITY = -1  # CUDA stream priorities: 0 is the default, lower numbers run first


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
