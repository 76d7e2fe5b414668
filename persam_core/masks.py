"""Binary masks <-> COCO compressed RLE, plus bbox and area.

COCO RLE (pycocotools.mask): `{"size": [h, w], "counts": str}`, run lengths of
alternating 0/1 pixels in column-major (Fortran) order, starting with zeros, LEB128-like
compressed into ASCII. `pycocotools.mask.decode` turns it back into an [h, w] uint8 array.
bbox is COCO xywh in pixels (x, y of the top-left pixel, width, height); an empty mask
has bbox [0, 0, 0, 0] and area 0.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode_rle(mask: np.ndarray) -> dict:
    """mask: [H, W] bool -> {"size": [H, W], "counts": str}."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """{"size": [H, W], "counts": str | bytes} -> [H, W] bool."""
    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(encoded).astype(bool)


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """mask: [H, W] bool -> COCO [x, y, width, height] of the tight box; zeros when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def area_px(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))
