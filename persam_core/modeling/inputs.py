"""What the CPU side needs to know about a model family's input, without building a model.

A job's CPU stages (reading, resizing, the embedding cache) run where the model is never
loaded: they ask `families.input_format(model_type)` how to resize an image for its encoder
and what the encoder hands the decoder besides the 64 x 64 features (each family names one
of the formats below). Each `resize` is exactly what
`as_backbone(model).resize` does for a model of that type (a test holds them equal).

    SAM   (vit_h/l/b/t, tiny)     longest side to 1024: pixels [h, w, 3] uint8 (at most 3 MiB);
                                  the device normalises and pads
    SAM 2 (sam2.1_*, tiny_sam2)   to_tensor + antialiased resize to 1024 x 1024: pixels
                                  [1024, 1024, 3] float32 (12 MiB); the device normalises

SAM 2's transform resizes values already scaled to [0, 1] in float32, so its result cannot be
shipped as uint8 bit-identically (rounding moves each value by up to 0.5 / 255 and changes the
features); the float32 pixels travel as they are, 4x the bytes of SAM's at the same size.
SAM 2's decoder also needs the encoder's two high-resolution feature levels
(`high_res_shapes`), which the embedding cache stores with the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from persam_core.modeling.resize import ENCODER_SIZE, resize_longest_side, resize_square
from persam_core.modeling.resized import ResizedImage

# SAM2Base at image_size 1024: the decoder's conv_s0 / conv_s1 projections of the trunk's
# stride-4 and stride-8 levels (transformer_dim / 8 and / 4 channels), finest first.
SAM2_HIGH_RES_SHAPES = ((32, ENCODER_SIZE // 4, ENCODER_SIZE // 4), (64, ENCODER_SIZE // 8, ENCODER_SIZE // 8))


@dataclass(frozen=True)
class InputFormat:
    """resize: [H, W, 3] uint8 RGB -> ResizedImage (the CPU-side step of the encoder's input);
    high_res_shapes: the per-image shape of each high-resolution feature level, () for SAM."""

    family: str
    resize: Callable[[np.ndarray], ResizedImage]
    high_res_shapes: tuple[tuple[int, int, int], ...] = ()


SAM_INPUT = InputFormat("sam", resize_longest_side)
SAM2_INPUT = InputFormat("sam2", resize_square, SAM2_HIGH_RES_SHAPES)
