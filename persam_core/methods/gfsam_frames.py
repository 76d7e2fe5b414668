"""GF-SAM's frames: every image is stretched to 1024 x 1024 (aspect ratio not kept), every
reference mask is resized to the same frame with torch's legacy nearest.

The data loader is part of the method (the GF-SAM contract §2): SAM encodes the stretched uint8 frame
(SamPredictor's own longest-side resize is then the identity, no padding), DINOv2 reads the
same frame as floats. PIL's bilinear resize antialiases when it shrinks; that is the
upstream behaviour (torchvision's Resize on a PIL image) and it changes the features.

torch is imported by the functions that use it: a job's read stage stretches images in
processes that never run a model, without torch (persam_core/modeling/resize.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from persam_core.modeling.resize import check_rgb
from . import gfsam_quirks
from .registry import FRAME_SIDE

if TYPE_CHECKING:
    import torch


def stretch_frame(image: np.ndarray) -> np.ndarray:
    """image: [H, W, 3] uint8 RGB -> [1024, 1024, 3] uint8, PIL bilinear (antialiased)."""
    check_rgb(image)
    if not gfsam_quirks.FAITHFUL.pil_stretch:  # quirk 3 off (tests only): an unantialiased tensor resize
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        out = F.interpolate(pixels, (FRAME_SIDE, FRAME_SIDE), mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((FRAME_SIDE, FRAME_SIDE), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def frame_mask(mask: np.ndarray) -> torch.Tensor:
    """mask: [H, W] bool or 0/1 -> [1024, 1024] float32 0/1 (torch legacy nearest)."""
    import torch
    import torch.nn.functional as F

    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"expected an [H, W] mask, got shape {array.shape}")
    values = torch.from_numpy((array != 0).astype(np.float32))
    return F.interpolate(values[None, None], (FRAME_SIDE, FRAME_SIDE), mode="nearest")[0, 0]
