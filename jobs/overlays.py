"""Overlay PNGs (image + tinted mask + outline + point + score) to eyeball a run."""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TINT = np.array([255, 40, 40], dtype=np.float32)


def safe_file_name(*parts: str) -> str:
    """A name that cannot leave its directory, unique per input (short hash suffix)."""
    text = "_".join(parts)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text.rsplit("/", 1)[-1])[:80].lstrip(".") or "item"
    return f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def render_overlay(image: np.ndarray, mask: np.ndarray, point: tuple[int, int] | None, caption: str) -> Image.Image:
    """image: [H, W, 3] uint8; mask: [H, W] bool -> tinted RGB overlay with outline, point, caption."""
    tinted = image.astype(np.float32)
    tinted[mask] = 0.5 * tinted[mask] + 0.5 * TINT
    picture = Image.fromarray(tinted.astype(np.uint8))
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
    outline = np.asarray(mask_image.filter(ImageFilter.MaxFilter(5))) != np.asarray(mask_image)
    pixels = np.asarray(picture).copy()
    pixels[outline] = (255, 255, 0)
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    radius = max(4, min(picture.size) // 80)
    if point is not None:
        x, y = point
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(40, 255, 40), outline=(0, 0, 0))
    draw.rectangle((0, 0, min(picture.size[0], 8 + 7 * len(caption)), 18), fill=(0, 0, 0))
    draw.text((4, 3), caption, fill=(255, 255, 255))
    return picture
