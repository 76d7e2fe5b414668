"""How the CPU side resizes an image to each frame of frames.py, without importing torch: a
job's read stage runs it in processes that never run a model (for SAM's frame and the
stretch frame no torch at all; SAM 2's resize imports it, see persam_core/modeling/resize.py)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from persam_core.modeling.families import input_format
from persam_core.modeling.resized import ResizedImage
from .gfsam_frames import stretch_frame
from .registry import FRAME_MODEL, FRAME_STRETCH


def stretch_resize(image: np.ndarray) -> ResizedImage:
    """image: [H, W, 3] uint8 -> the 1024 x 1024 stretch frame; original_size stays (H, W)."""
    return ResizedImage(stretch_frame(image), (int(image.shape[0]), int(image.shape[1])))


def frame_resize(frame: str, model_type: str) -> Callable[[np.ndarray], ResizedImage]:
    """How the CPU side resizes an image for `frame` (no model is built)."""
    if frame == FRAME_MODEL:
        return input_format(model_type).resize
    if frame == FRAME_STRETCH:
        return stretch_resize
    raise ValueError(f"unknown frame {frame!r}")
