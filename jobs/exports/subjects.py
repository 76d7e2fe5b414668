"""Masked subject crops (`persam export subjects`): a DreamBooth-style training set.

    <output>/<concept>/<name>.png   the mask's bounding box, RGBA, transparent background
    <output>/<concept>/<name>.jpg   the same crop on white

Only usable rows (rows.usable). Missing, unreadable and undecodable images are skipped
with one line each; so are changed images (content_sha256 differs): their crops would be
wrong training data.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from persam_core.masks import decode_rle

from jobs.storage.redaction import redact
from jobs.exports.request import ExportRequest
from jobs.exports.images import ImageReader, build_locator
from jobs.exports.names import safe_file_name
from jobs.exports.rows import usable
from jobs.exports.sink import Folder
from jobs.storage.schema import AREA, BBOX, CONTENT_SHA256, HEIGHT, INSTANCE, MASK_RLE, PRESENT, WIDTH

COLUMNS = (WIDTH, HEIGHT, MASK_RLE, BBOX, AREA, INSTANCE, PRESENT, CONTENT_SHA256)


def _encoded(picture: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, **options)
    return buffer.getvalue()


def crops(image: np.ndarray, row: dict) -> tuple[bytes, bytes]:
    """image: [H, W, 3] uint8 -> (RGBA PNG, white-background JPEG) of the row's mask box."""
    mask = decode_rle(row[MASK_RLE])
    x, y, w, h = row[BBOX]
    crop, crop_mask = image[y : y + h, x : x + w], mask[y : y + h, x : x + w]
    rgba = np.dstack([crop, crop_mask.astype(np.uint8) * 255])
    white = np.where(crop_mask[..., None], crop, 255).astype(np.uint8)
    return (_encoded(Image.fromarray(rgba, "RGBA"), format="PNG", compress_level=1),
            _encoded(Image.fromarray(white), format="JPEG", quality=95))


def export_subjects(request: ExportRequest) -> str:
    dataset, output, images, _, storage_options, log = request.fields()
    reader = ImageReader(build_locator(dataset, images, None, names=False), storage_options, log, skip_changed=True)
    folder, written = Folder(output, storage_options), 0
    for uri, rows in dataset.images(COLUMNS):
        rows = [r for r in rows if usable(r)]
        loaded = reader.load(uri, rows) if rows else None
        if loaded is None:
            continue
        for row in rows:
            stem = f"{safe_file_name(row['concept'])}/{safe_file_name(uri, row['concept'], str(row.get('instance') or 0))}"
            png, jpg = crops(loaded.pixels, row)
            folder.write(f"{stem}.png", png)
            folder.write(f"{stem}.jpg", jpg)
            written += 2
    return f"{written} subject files{reader.summary()} -> {redact(output)}"
