"""Overlay PNGs (image + tinted mask + outline + point + score) to eyeball a run."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image, ImageDraw, ImageFilter

from persam_core.masks import decode_rle

from .images import decode_image
from .inputs import read_bytes

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


def write_overlays(masks_url: str, out_dir: str, limit: int | None = None, storage_options: dict | None = None) -> list[Path]:
    """Render up to `limit` non-error rows of a mask Parquet dataset -> PNG paths."""
    fs, root = url_to_fs(masks_url, **(storage_options or {}))
    table = pq.read_table(root, filesystem=fs)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for row in table.to_pylist():
        if limit is not None and len(written) >= limit:
            break
        if row["error"] is not None or row["mask_rle"] is None:
            continue
        image = decode_image(read_bytes(row["image_uri"], storage_options), row["image_uri"])
        caption = f"{row['concept']} score {row['score']:.2f} sim {row['similarity']:.2f}"
        picture = render_overlay(image, decode_rle(row["mask_rle"]), tuple(row["point"]) if row["point"] else None, caption)
        path = target / f"{safe_file_name(row['image_uri'], row['concept'], str(row.get('instance') or 0))}.png"
        picture.save(path)
        written.append(path)
    return written
