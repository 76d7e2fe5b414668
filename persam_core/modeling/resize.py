"""The CPU-side resizes of the encoders' inputs, importable without torch.

A job's read stage resizes every image in processes that never run a model; for SAM it needs
no torch at all (importing torch, torchvision and segment_anything costs such a process about
3 s of CPU). `resize_longest_side` is SamPredictor's resize (segment_anything's
`ResizeLongestSide.apply_image`: torchvision's resize of a PIL image, which is PIL's bilinear
resize) written with PIL directly; a test holds the two equal. SAM 2's `resize_square` resizes
float tensors, so it imports torch when called.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from persam_core.modeling.resized import ResizedImage

ENCODER_SIZE = 1024


def longest_side_shape(height: int, width: int, side: int = ENCODER_SIZE) -> tuple[int, int]:
    """(H, W) -> (h, w) with max(h, w) == side, rounded as ResizeLongestSide.get_preprocess_shape."""
    scale = side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def check_rgb(image: np.ndarray) -> None:
    """A ValueError unless image is [H, W, 3] uint8 (what every encoder-frame resize takes)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")


def resize_longest_side(image: np.ndarray) -> ResizedImage:
    """image: [H, W, 3] uint8 RGB -> ResizedImage (bit-identical to SamPredictor's resize)."""
    check_rgb(image)
    height, width = longest_side_shape(image.shape[0], image.shape[1])
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR)
    return ResizedImage(np.ascontiguousarray(np.asarray(resized)), (int(image.shape[0]), int(image.shape[1])))


def resize_square(image: np.ndarray, size: int = ENCODER_SIZE) -> ResizedImage:
    """[H, W, 3] uint8 RGB -> ResizedImage with pixels [size, size, 3] float32 in [0, 1]
    (SAM2Transforms' to_tensor + antialiased Resize, bit for bit). Rounding the result to
    uint8 would change every encoder input by up to 0.5 / 255, hence float32."""
    from torchvision.transforms import functional as TF  # SAM 2's own transform (see the module docstring)

    check_rgb(image)
    # to_tensor wraps the array without a copy and warns on read-only ones (a decoded PIL image)
    writable = image if image.flags.writeable else image.copy()
    resized = TF.resize(TF.to_tensor(writable), [size, size])  # [3, size, size]
    return ResizedImage(np.ascontiguousarray(resized.permute(1, 2, 0).numpy()), (int(image.shape[0]), int(image.shape[1])))
