"""Mask overlays for the review gallery, drawn with torchvision.utils.

An overlay is the image with the mask tinted (alpha 0.5), a yellow outline just outside
the mask (so the object's own pixels stay visible) and the positive point as a green dot.
The thumbnail is drawn at thumbnail size rather than shrunk from the full overlay, so its
outline and point stay visible however large the image is.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import draw_keypoints, draw_segmentation_masks

THUMBNAIL_SIDE = 512
TINT, OUTLINE, POINT = (255, 40, 40), (255, 255, 0), (40, 255, 40)


def _outline(mask: torch.Tensor, width: int) -> torch.Tensor:
    """mask: [H, W] bool -> [H, W] bool ring of `width` pixels just outside it (a square
    dilation, as two 1-D max-pools: a quarter of the cost of one 2-D pool at width 5)."""
    grown = mask[None, None].float()
    grown = F.max_pool2d(grown, kernel_size=(2 * width + 1, 1), stride=1, padding=(width, 0))
    grown = F.max_pool2d(grown, kernel_size=(1, 2 * width + 1), stride=1, padding=(0, width))
    return (grown[0, 0] > 0) & ~mask


def draw_overlay(image: np.ndarray, mask: np.ndarray | None, point: tuple[int, int] | None) -> Image.Image:
    """image: [H, W, 3] uint8; mask: [H, W] bool or None (absent: the image alone) -> RGB overlay."""
    picture = torch.from_numpy(image.copy()).permute(2, 0, 1)  # a copy: decoded arrays may be read-only
    height, width = image.shape[:2]
    side = min(height, width)
    if mask is not None and mask.any():
        ring = max(1, side // 256)
        # draw within the mask's box (+ the ring): draw_segmentation_masks blends every pixel it is given
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom = max(0, rows[0] - ring), min(height, rows[-1] + 1 + ring)
        left, right = max(0, columns[0] - ring), min(width, columns[-1] + 1 + ring)
        region = torch.from_numpy(np.ascontiguousarray(mask[top:bottom, left:right]))
        box = draw_segmentation_masks(picture[:, top:bottom, left:right], region, alpha=0.5, colors=TINT)
        # opaque: a plain assignment (draw_segmentation_masks would blend the box again)
        box[:, _outline(region, ring)] = torch.tensor(OUTLINE, dtype=torch.uint8)[:, None]
        picture[:, top:bottom, left:right] = box
    if point is not None:
        radius = max(3, side // 100)
        picture = draw_keypoints(picture, torch.tensor([[point]], dtype=torch.float32), colors=POINT, radius=radius)
    return Image.fromarray(picture.permute(1, 2, 0).numpy())


def thumbnail_inputs(image: np.ndarray, mask: np.ndarray | None, point: tuple[int, int] | None,
                     side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
    """(image, mask, point) shrunk so the longest side is at most `side` (unchanged if already)."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image, mask, point
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    small_mask = None
    if mask is not None:  # box-filtered coverage >= 50 %: the shrunk mask keeps thin parts fairly
        coverage = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
        small_mask = np.asarray(coverage) >= 128
    small_point = None if point is None else (int(point[0] * scale), int(point[1] * scale))
    return small, small_mask, small_point


def jpeg(picture: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
