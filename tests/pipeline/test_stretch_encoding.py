"""The model actor's stretch-frame encoding (GF-SAM): DINOv2 at the SAM encoder's precision,
and DINOv2 alone (no SAM features) for a presence pass."""

from __future__ import annotations

import numpy as np
import torch

from jobs.pipeline import compute
from jobs.pipeline.payload import Chunk, ChunkItem, ChunkResults
from persam_core.speed.acceleration import EncoderSpeed
from persam_core.modeling.dinov2 import build_random_dinov2


def test_the_jobs_encode_dinov2_at_the_encoders_precision(monkeypatch):
    """compute.encode_stretch hands DINOv2 the spec's resolved precision (bf16 on CUDA by default)."""
    model = build_random_dinov2("tiny", 0)
    asked = []
    monkeypatch.setattr(compute, "frame_tokens", lambda m, f, precision="fp32": asked.append(precision) or
                        torch.zeros(f.shape[0], 1369, 64))
    chunk = Chunk(0, 0, [ChunkItem("a", source="pixels", original_size=(8, 8))],
                  stretch={0: np.zeros((1024, 1024, 3), np.uint8)})
    speed = EncoderSpeed(precision="bf16", fused_attention=False, compile=False, batch_size=1, decoder_graphs=False,
                         decoder_precision="fp32", tf32=False, decoder_compile=False)
    batches = compute.encode_stretch(None, model, chunk, speed, ChunkResults())
    assert asked == ["bf16"] and batches[0][1][0].encoded is None  # no SAM: a presence pass's tokens alone
