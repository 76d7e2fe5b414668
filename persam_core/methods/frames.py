"""The per-image inputs of the methods: which frame an image is resized to, and what the
model actor hands a method's engine for each image.

    model    the SAM family's own frame (persam_core.modeling.inputs): SAM's longest side to 1024 and
             padding, SAM 2's 1024 x 1024; PerSAM and PerSAM-F read its SAM features
    stretch  the image stretched to 1024 x 1024 (GF-SAM's data loader, gfsam_frames.py): SAM
             features of the stretched frame plus DINOv2 tokens of the same frame

A run that mixes methods of both frames encodes each image once per frame. The CPU side's
resize to each frame is frame_resize.py's (torch-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from persam_core.modeling.predictor import EncodedImage
from .registry import FRAME_SIDE


@dataclass(frozen=True)
class FrameImage:
    """One image as an engine reads it: SAM's encoding of the frame (features [256, 64, 64],
    input size, original size) and, for the stretch frame, DINOv2 tokens [1369, C] (else None).
    A presence pass that reads no SAM features (Engine.score_reads_sam False) gets `encoded`
    None and the image's (H, W) in `size`."""

    encoded: EncodedImage | None
    tokens: Tensor | None = None
    size: tuple[int, int] | None = None

    @property
    def original_size(self) -> tuple[int, int]:
        """(H, W) of the image as displayed."""
        return tuple(self.encoded.original_size) if self.encoded is not None else tuple(self.size)


def frame_tensor(pixels: Tensor) -> Tensor:
    """Stretch frames [B, 1024, 1024, 3] uint8 (any device) -> [B, 3, 1024, 1024] float in [0, 1]
    (ToTensor's x / 255, what DINOv2 reads)."""
    assert pixels.shape[1:] == (FRAME_SIDE, FRAME_SIDE, 3), pixels.shape
    return pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
