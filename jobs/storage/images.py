"""Bytes -> RGB pixels and reference masks, for every odd file a data lake holds.

Images come out as [H, W, 3] uint8 RGB in *displayed* orientation (EXIF applied, as
OpenCV's imread does for the reference), so `width`/`height`/masks in the output are in
that orientation. Alpha is dropped (the stored colour is kept, as imread does); 16-bit
samples are scaled to 8 bits by >> 8 (imread's conversion); palette, grayscale and CMYK
are converted to RGB; animations and multi-page files give their first frame. Anything
larger than `max_pixels` is refused before decoding (decompression-bomb guard). Only the
decoders of DECODER_FORMATS are used, whatever the file's name or content.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
# Our own `max_pixels` check (before decoding) replaces PIL's fixed bomb limit, so that
# --max-pixels can be raised or lowered.
Image.MAX_IMAGE_PIXELS = None
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# The only decoders bytes ever reach, whatever the file is named: the formats we list, so
# a `.jpg` holding EPS (Ghostscript), PSD or another rarely exercised decoder is an error
# row, not an attack surface. (JPEG's opener also reads camera MPO files.)
DECODER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an image; the message names the source and the reason."""


def _open(data: bytes, source: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{source}: empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=list(DECODER_FORMATS))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageDecodeError(f"{source}: not a decodable image ({type(error).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{source}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}; "
            "raise --max-pixels if this image is legitimate"
        )
    return image


def _first_frame_loaded(image: Image.Image, source: str) -> Image.Image:
    try:
        image.seek(0)
        image.load()
        return ImageOps.exif_transpose(image) or image
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"{source}: image data is corrupt or truncated ({error})") from None


def _to_uint8_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.uint32)
        if image.mode == "I" and values.max(initial=0) <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = (values >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    # PIL's RGBA/LA/PA -> RGB drops alpha and keeps the stored colour, as imread does.
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> [H, W, 3] uint8 RGB, displayed orientation; ImageDecodeError if not."""
    image = _first_frame_loaded(_open(data, source, max_pixels), source)
    try:
        return _to_uint8_rgb(image)
    except (OSError, ValueError) as error:
        raise ImageDecodeError(f"{source}: cannot convert {image.mode} image to RGB ({error})") from None


def decode_mask(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Mask file bytes -> [H, W] bool: any non-zero pixel is foreground.

    Palette PNGs (PerSeg/DAVIS: index 0 = background, any other index = object, whatever
    the palette colours), grayscale 0/255 or 0/1 and RGB masks all read the same way.
    EXIF orientation is applied like the image's.
    """
    image = _first_frame_loaded(_open(data, source, max_pixels), source)
    if image.mode in ("RGBA", "LA"):
        values = np.asarray(image)[..., :-1]
    else:
        values = np.asarray(image)
    mask = values.any(axis=2) if values.ndim == 3 else values != 0
    return np.ascontiguousarray(mask)
