"""An image resized for an encoder, as the CPU stages ship it: numpy only, so that the stages
that only read it (payload, finish) import neither torch nor the models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResizedImage:
    """An RGB image resized for the encoder: SAM's ResizeLongestSide (pixels [h, w, 3] uint8
    with max(h, w) == 1024) or SAM 2's square resize (pixels [1024, 1024, 3] float32 in [0, 1]);
    original_size: (H, W) before resizing.
    """

    pixels: np.ndarray
    original_size: tuple[int, int]

    @property
    def input_size(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))
